"""Every message size crosses the pipes, both ways, without a hang.

The sizes sit on the edges of each path: a pipe page (4 KiB), the socket
buffer (about 208 KiB: 200 and 240 KiB fall on either side), the store
threshold (256 KiB) and well above it.  Values between the socket buffer
and the threshold travel inside the socket message, so a busy worker's
socket fills up while its answer waits to be read: the case that once hung.
Arguments and results have the size (bytes, and numpy arrays, whose buffer
goes out of band); each call runs several tasks of one size, so that a
worker gets a second task while it sends its first answer.  A hang fails
the test by its timeout.
"""

import concurrent.futures
import multiprocessing

import numpy as np
import pytest

import shmpool

from conftest import DEADLOCK_TIMEOUT, START_METHODS

KiB = 1 << 10
SIZES = [4 * KiB - 1, 4 * KiB + 1, 64 * KiB, 200 * KiB, 240 * KiB, 256 * KiB - 1,
         256 * KiB + 1, 1024 * KiB]


def tasks_for(nbytes: int) -> int:
    """Tasks per call: 12 (the reported hang) where values travel in-band
    and exceed the socket buffer; fewer elsewhere, to keep the file fast."""
    return 12 if 128 * KiB < nbytes < 256 * KiB else 4


def make(kind: str, nbytes: int, seed: int):
    """A value of *nbytes* bytes whose content depends on *seed*."""
    data = (np.arange(nbytes, dtype=np.uint32) * 7 + seed).astype(np.uint8)
    return data.tobytes() if kind == "bytes" else data


def answer(value):
    """A result as large as *value*, of the same kind, derived from it."""
    if isinstance(value, bytes):
        return value[::-1]
    return value[::-1] + np.uint8(1)


def answer_pair(value, tag):
    return tag, answer(value)


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def values(kind: str, nbytes: int):
    return [make(kind, nbytes, seed) for seed in range(tasks_for(nbytes))]


@pytest.fixture(scope="module", params=[(m, n) for m in START_METHODS for n in (1, 2)],
                ids=[f"{m}-{n}worker" for m in START_METHODS for n in (1, 2)])
def pool(request):
    method, workers = request.param
    with shmpool.Pool(workers, context=multiprocessing.get_context(method)) as p:
        yield p


@pytest.fixture(scope="module", params=[(m, n) for m in START_METHODS for n in (1, 2)],
                ids=[f"{m}-{n}worker" for m in START_METHODS for n in (1, 2)])
def executor(request):
    method, workers = request.param
    with shmpool.ProcessPoolExecutor(workers,
                                     mp_context=multiprocessing.get_context(method)) as ex:
        yield ex


def _sweep(call, kind: str) -> None:
    """``call(values)`` at every size must return their answers in order."""
    for size in SIZES:
        sent = values(kind, size)
        try:
            got = call(sent)
        except (multiprocessing.TimeoutError, concurrent.futures.TimeoutError):
            pytest.fail(f"{size} bytes: the call hung")
        assert len(got) == len(sent), f"{size} bytes: {len(got)} results for {len(sent)} tasks"
        for result, value in zip(got, sent):
            assert same(result, answer(value)), f"{size} bytes: wrong result"


POOL_CALLS = {
    "map": lambda p, xs, c: p.map_async(answer, xs, chunksize=c).get(DEADLOCK_TIMEOUT),
    "starmap": lambda p, xs, c: [r for _, r in p.starmap_async(
        answer_pair, [(x, i) for i, x in enumerate(xs)], chunksize=c).get(DEADLOCK_TIMEOUT)],
    # imap's default chunksize is 1: "default" runs it chunked instead
    "imap": lambda p, xs, c: _drain(p.imap(answer, xs, chunksize=c or 2), len(xs)),
    "apply_async": lambda p, xs, c: [r.get(DEADLOCK_TIMEOUT) for r in
                                     [p.apply_async(answer, (x,)) for x in xs]],
}


def _drain(iterator, count: int) -> list:
    if not hasattr(iterator, "next"):          # chunksize > 1: a plain generator
        return list(iterator)
    return [iterator.next(timeout=DEADLOCK_TIMEOUT) for _ in range(count)]


POOL_CASES = [("map", 1), ("map", None), ("starmap", 1), ("starmap", None), ("imap", 1),
              ("imap", None), ("apply_async", None)]


@pytest.mark.parametrize("kind", ["bytes", "ndarray"])
@pytest.mark.parametrize("call, chunksize", POOL_CASES,
                         ids=[f"{c}-chunksize{k or '-default'}" for c, k in POOL_CASES])
def test_pool_calls_complete_at_every_size(pool, call, chunksize, kind):
    _sweep(lambda sent: POOL_CALLS[call](pool, sent, chunksize), kind)


EXECUTOR_CALLS = {
    "submit": lambda ex, xs, c: [f.result(DEADLOCK_TIMEOUT) for f in
                                 [ex.submit(answer, x) for x in xs]],
    "map": lambda ex, xs, c: list(ex.map(answer, xs, timeout=DEADLOCK_TIMEOUT, chunksize=c)),
}

EXECUTOR_CASES = [("submit", 1), ("map", 1), ("map", 3)]


@pytest.mark.parametrize("kind", ["bytes", "ndarray"])
@pytest.mark.parametrize("call, chunksize", EXECUTOR_CASES,
                         ids=[f"{c}-chunksize{k}" for c, k in EXECUTOR_CASES])
def test_executor_calls_complete_at_every_size(executor, call, chunksize, kind):
    _sweep(lambda sent: EXECUTOR_CALLS[call](executor, sent, chunksize), kind)
