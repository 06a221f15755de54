"""Libraries that take a pool, an executor or a context: dask, joblib,
asyncio, tqdm, logging's QueueHandler.  Same results as with the standard
library; big blocks through the store where the library lets them.
"""

import asyncio
import concurrent.futures
import logging
import logging.handlers
import multiprocessing
import multiprocessing.pool
import os

import numpy as np
import pytest

import shmpool
from shmpool import testing

from conftest import DEADLOCK_TIMEOUT

pytestmark = [pytest.mark.timeout(DEADLOCK_TIMEOUT * 3), pytest.mark.once]

MiB = 1 << 20
#: One dask block: 2 MiB of float64, above the store's threshold.
BLOCK = (512, 512)


# -- dask -------------------------------------------------------------------------

dask = pytest.importorskip("dask", reason="dask is in the test extra: pip install -e '.[test]'")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")


def _dask_array_results(**compute_kwargs):
    x = da.arange(2048 * 1024, dtype=np.float64, chunks=BLOCK[0] * BLOCK[1]).reshape(
        (2048, 1024), limit="2MiB")
    y = (x * 2 + 1).rechunk(BLOCK)
    blocks = y.compute(**compute_kwargs)
    total = (y.sum(axis=0) - x.mean(axis=0)).compute(**compute_kwargs)
    return blocks, total


def _dask_bag_result(**compute_kwargs):
    bag = db.from_sequence(range(40), npartitions=8)
    return sorted(bag.map(lambda i: i * i).filter(lambda v: v % 3).compute(**compute_kwargs))


@pytest.fixture(scope="module")
def dask_expected():
    blocks, total = _dask_array_results(scheduler="sync")
    return blocks, total, _dask_bag_result(scheduler="sync")


def _check_dask(pool, expected) -> None:
    blocks, total, bag = expected
    got_blocks, got_total = _dask_array_results(scheduler="processes", pool=pool)
    np.testing.assert_array_equal(got_blocks, blocks)
    np.testing.assert_allclose(got_total, total)
    assert _dask_bag_result(scheduler="processes", pool=pool) == bag


def test_dask_with_the_stdlib_executor_on_shmpool_s_context(dask_expected):
    executor = concurrent.futures.ProcessPoolExecutor(2, mp_context=shmpool.get_context("spawn"))
    with executor:
        _check_dask(executor, dask_expected)
        # dask sends its blocks as pickled bytes: 2 MiB results went through
        # the result queue's store.
        assert executor._result_queue.statistics().peak_in_use >= 2 * MiB


def test_dask_with_the_stdlib_pool_on_shmpool_s_context(dask_expected):
    with multiprocessing.pool.Pool(2, context=shmpool.get_context("spawn")) as pool:
        _check_dask(pool, dask_expected)
        assert pool._outqueue.statistics().peak_in_use >= 2 * MiB


def test_dask_with_shmpool_s_executor(dask_expected):
    with shmpool.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as executor:
        _check_dask(executor, dask_expected)
        assert testing.pool_store(executor).statistics().peak_in_use >= 2 * MiB


def test_dask_with_shmpool_s_pool(dask_expected):
    with shmpool.Pool(2, context=multiprocessing.get_context("spawn")) as pool:
        _check_dask(pool, dask_expected)


# -- joblib -------------------------------------------------------------------------

joblib = pytest.importorskip("joblib", reason="joblib is in the test extra")


class ShmpoolBackend(joblib.ParallelBackendBase):
    """The README's joblib backend: joblib's batches run on a ``shmpool.Pool``
    (public API only), so big arguments and results go through the store."""

    supports_retrieve_callback = True

    def __init__(self, context=None, **backend_kwargs):
        super().__init__(**backend_kwargs)
        self._context = context
        self._pool = None

    def effective_n_jobs(self, n_jobs):
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        return max(os.cpu_count() + 1 + n_jobs, 1) if n_jobs < 0 else n_jobs

    def configure(self, n_jobs=1, parallel=None, **backend_kwargs):
        n_jobs = self.effective_n_jobs(n_jobs)
        self.parallel = parallel
        if self._pool is None:
            self._pool = shmpool.Pool(n_jobs, context=self._context)
        return n_jobs

    def submit(self, func, callback=None):
        return self._pool.apply_async(func, callback=callback, error_callback=callback)

    def retrieve_result_callback(self, out):
        if isinstance(out, BaseException):
            raise out
        return out

    def terminate(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def abort_everything(self, ensure_ready=True):
        self.terminate()
        if ensure_ready:
            self.configure(self.parallel.n_jobs, self.parallel)


def _block(i):
    return np.full(MiB // 8, float(i))        # 1 MiB: through the store


def _fails(i):
    raise ValueError(f"task {i} failed")


def test_joblib_backend_over_shmpool_pool(mp_context):
    joblib.register_parallel_backend("shmpool", lambda **kw: ShmpoolBackend(mp_context, **kw))
    with joblib.parallel_config(backend="shmpool", n_jobs=2):
        results = joblib.Parallel()(joblib.delayed(_block)(i) for i in range(8))
        squares = joblib.Parallel()(joblib.delayed(pow)(i, 2) for i in range(100))
        with pytest.raises(ValueError, match=r"task [345] failed"):
            joblib.Parallel()(joblib.delayed(_fails)(i) for i in range(3, 6))
    assert [float(r[0]) for r in results] == [float(i) for i in range(8)]
    assert all(testing.in_any_store(r) for r in results)   # views of the Pool's store
    assert squares == [i * i for i in range(100)]


# -- asyncio, tqdm, logging ----------------------------------------------------------

def test_asyncio_run_in_executor():
    async def main(executor):
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(executor, _block, i) for i in range(4)))

    with shmpool.ProcessPoolExecutor(2) as executor:
        results = asyncio.run(main(executor))
    assert [float(r[-1]) for r in results] == [0.0, 1.0, 2.0, 3.0]


def test_tqdm_over_imap_and_as_completed():
    tqdm = pytest.importorskip("tqdm", reason="tqdm is in the test extra").tqdm
    with shmpool.Pool(2) as pool:
        seen = list(tqdm(pool.imap(abs, range(-50, 0)), total=50, disable=True))
    assert seen == list(range(50, 0, -1))
    with shmpool.ProcessPoolExecutor(2) as executor:
        futures = [executor.submit(abs, i) for i in range(-20, 0)]
        done = [f.result() for f in tqdm(concurrent.futures.as_completed(futures),
                                         total=len(futures), disable=True)]
    assert sorted(done) == list(range(1, 21))


def _send_logs_to(q):
    """Pool initializer: this worker's log records go to *q*."""
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(q)]
    root.setLevel(logging.INFO)


def _log(i):
    logging.getLogger("shmpool-test").info("record %d", i)
    return i


def test_logging_queue_handler_through_a_shmpool_queue(mp_context):
    q = shmpool.Queue(ctx=mp_context)
    with shmpool.Pool(2, _send_logs_to, (q,), context=mp_context) as pool:
        assert pool.map(_log, range(6)) == list(range(6))
    records = [q.get(timeout=DEADLOCK_TIMEOUT) for _ in range(6)]
    assert sorted(r.getMessage() for r in records) == [f"record {i}" for i in range(6)]
    assert {r.name for r in records} == {"shmpool-test"}
    q.close()
