"""``shmpool.get_context``: a real ``multiprocessing`` context, and the
standard library's own pools built on it (their tasks and results going
through shmpool's SimpleQueue and its ``_reader``/``_writer`` ends).

CPython's full executor and Pool test classes run on this context in
``tests/compat/test_cpython_over_context.py``; these are the direct checks.
"""

import concurrent.futures
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.pool
import os
import signal
import time

import numpy as np
import pytest

import shmpool
from shmpool import testing

from conftest import DEADLOCK_TIMEOUT, START_METHODS

pytestmark = pytest.mark.timeout(DEADLOCK_TIMEOUT * 2)

MiB = 1 << 20


@pytest.fixture(params=START_METHODS)
def method(request):
    return request.param


def _full(nbytes: int) -> np.ndarray:
    return np.full(nbytes // 8, 1.5)


def _sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


# -- the context -------------------------------------------------------------

def test_is_a_multiprocessing_context(method):
    ctx = shmpool.get_context(method)
    assert isinstance(ctx, multiprocessing.context.BaseContext)
    assert ctx.get_start_method() == method
    assert ctx.multiprocessing_context is multiprocessing.get_context(method)
    assert ctx.Process is multiprocessing.get_context(method).Process
    assert ctx._name == method
    assert ctx.get_context() is ctx
    assert ctx.get_context("spawn").get_start_method() == "spawn"
    assert isinstance(ctx.get_context("spawn"), type(ctx))


def test_pool_and_queues_are_shmpool_s_the_rest_the_wrapped_context_s(method):
    ctx = shmpool.get_context(method)
    queues = [ctx.Queue(), ctx.JoinableQueue(), ctx.SimpleQueue()]
    assert [type(q) for q in queues] == [shmpool.Queue, shmpool.JoinableQueue, shmpool.SimpleQueue]
    lock = ctx.Lock()
    assert type(lock) is type(multiprocessing.get_context(method).Lock())
    assert ctx.cpu_count() == multiprocessing.cpu_count()
    assert ctx.reducer is multiprocessing.get_context(method).reducer
    for q in queues:
        q.close()


def test_process_keeps_the_start_method(method):
    ctx = shmpool.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=q.put, args=(method,))
    assert p._start_method == method
    p.start()
    assert q.get(timeout=DEADLOCK_TIMEOUT) == method
    p.join(DEADLOCK_TIMEOUT)
    assert p.exitcode == 0
    q.close()


def test_unknown_start_method_is_refused():
    with pytest.raises(ValueError):
        shmpool.get_context("no-such-method")


# -- the SimpleQueue's ends ----------------------------------------------------

def test_simple_queue_ends_behave_like_connections():
    q = shmpool.SimpleQueue()
    reader, writer = q._reader, q._writer
    assert reader is q._reader                     # one object: usable in `in ready`
    assert not reader.poll() and not reader.poll(0.05)
    writer.send({"x": 1})
    assert multiprocessing.connection.wait([reader], timeout=DEADLOCK_TIMEOUT) == [reader]
    assert reader.poll() and reader.recv() == {"x": 1}
    q.put(_full(MiB))
    arr = reader.recv()
    assert testing.in_any_store(arr)               # through the store
    writer.close()
    assert writer.closed and not reader.closed
    assert reader.poll(DEADLOCK_TIMEOUT)           # end of file, as a Connection says
    with pytest.raises(EOFError):
        reader.recv()
    with pytest.raises(OSError):
        writer.send(1)
    reader.close()
    assert reader.closed
    with pytest.raises(AttributeError, match="writing end of a shmpool.SimpleQueue has no 'send_bytes'"):
        writer.send_bytes(b"")
    with pytest.raises(AttributeError, match="use the queue's get"):
        reader.recv_bytes()
    q.close()


# -- the standard library's executor on the context ------------------------------

def test_stdlib_executor_on_the_context(method):
    ctx = shmpool.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as executor:
        assert executor.submit(abs, -1).result(timeout=DEADLOCK_TIMEOUT) == 1
        assert list(executor.map(abs, range(-20, 0), timeout=DEADLOCK_TIMEOUT)) == list(range(20, 0, -1))
        result = executor.submit(_full, 8 * MiB).result(timeout=DEADLOCK_TIMEOUT)
    assert result.nbytes == 8 * MiB and float(result[-1]) == 1.5
    assert testing.in_any_store(result)            # a view of the result queue's store


def test_stdlib_executor_on_the_context_breaks_on_a_death(method):
    executor = concurrent.futures.ProcessPoolExecutor(2, mp_context=shmpool.get_context(method))
    future = executor.submit(_die)
    with pytest.raises(concurrent.futures.process.BrokenProcessPool):
        future.result(timeout=DEADLOCK_TIMEOUT)
    executor.shutdown(wait=True)


# -- the standard library's Pool on the context ----------------------------------

def test_stdlib_pool_on_the_context(method):
    with multiprocessing.pool.Pool(2, context=shmpool.get_context(method)) as pool:
        assert pool.map(abs, range(-50, 0), chunksize=3) == list(range(50, 0, -1))
        assert sorted(pool.imap_unordered(abs, range(-5, 0))) == [1, 2, 3, 4, 5]
        results = pool.map(_full, [4 * MiB] * 4)
        assert all(testing.in_any_store(r) and float(r.sum()) == 1.5 * MiB / 2
                   for r in results)
        arg_sum = pool.apply(np.sum, (_full(4 * MiB),))
        assert arg_sum == 1.5 * MiB / 2
        pool.close()
        pool.join()


def test_stdlib_pool_on_the_context_terminates_with_tasks_queued(method):
    pool = multiprocessing.pool.Pool(2, context=shmpool.get_context(method))
    pending = [pool.apply_async(_sleep_then, (0.2, i)) for i in range(20)]
    assert pending[0].get(timeout=DEADLOCK_TIMEOUT) == 0
    started = time.monotonic()
    pool.terminate()
    pool.join()
    assert time.monotonic() - started < DEADLOCK_TIMEOUT


def test_stdlib_pool_on_the_context_with_maxtasksperchild(method):
    with multiprocessing.pool.Pool(2, maxtasksperchild=2, context=shmpool.get_context(method)) as pool:
        assert pool.map(abs, range(-10, 0), chunksize=1) == list(range(10, 0, -1))
        pool.close()
        pool.join()


# -- PyTorch --------------------------------------------------------------------

def test_pytorch_dataloader_accepts_the_context():
    torch = pytest.importorskip(
        "torch", reason="PyTorch is not installed (a download of several hundred MB, so not "
                        "in the test extra); install it to run this check")
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.arange(32, dtype=torch.float32))
    loader = DataLoader(data, batch_size=8, num_workers=2,
                        multiprocessing_context=shmpool.get_context("spawn"))
    assert sorted(float(x) for (batch,) in loader for x in batch) == [float(i) for i in range(32)]
