"""shmpool.Pool against multiprocessing.Pool, under every start method."""

import multiprocessing
import multiprocessing.pool
import os
import random
import signal
import threading
import time

import numpy as np
import pytest

import shmpool
from shmpool import testing

from conftest import DEADLOCK_TIMEOUT, START_METHODS

MiB = 1 << 20


# -- task functions (module level, for spawn) --------------------------------

def square(x):
    return x * x


def add(a, b):
    return a + b


def describe(value):
    """A nested result of plain objects and arrays, derived from the input."""
    return {"n": value, "items": [value, str(value), (value, None)],
            "arr": np.arange(value, dtype=np.float64), "big": np.full(40_000, float(value))}


def array_sum(arr):
    return float(arr.sum())


def make_array(nbytes):
    return np.arange(nbytes // 4, dtype=np.float32)


def raise_value_error(x):
    raise ValueError(f"bad input {x}")  # the traceback names this line


def sleep_then(seconds):
    time.sleep(seconds)
    return seconds


def pid_of_worker(_=None):
    return os.getpid()


_initialized = None


def set_initialized(value):
    global _initialized
    _initialized = value


def get_initialized(_=None):
    return _initialized


def die_on(x, victim):
    if x == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def return_unpicklable(_):
    return threading.Lock()


def forever(_):
    threading.Event().wait()


class KeywordOnlyError(Exception):
    """Pickles, but cannot be unpickled: __init__ takes a keyword-only
    argument and there is no __reduce__ (CPython issue 79492 hangs here)."""

    def __init__(self, *, code):
        super().__init__(f"code {code}")


def raise_unloadable(_):
    raise KeywordOnlyError(code=7)


def raise_unpicklable(_):
    raise ValueError(threading.Lock())


def return_unloadable(_):
    return [testing.FailsToUnpickle(), np.ones(MiB)]


# -- fixtures ----------------------------------------------------------------

@pytest.fixture(scope="module", params=START_METHODS)
def pools(request):
    """A stdlib pool and a shmpool pool of the same start method."""
    ctx = multiprocessing.get_context(request.param)
    with ctx.Pool(2) as reference, shmpool.Pool(2, context=ctx) as ours:
        yield reference, ours


def _same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


CALLS = {
    "map": lambda p: p.map(square, range(100)),
    "map-chunk7": lambda p: p.map(square, range(100), chunksize=7),
    "map-empty": lambda p: p.map(square, []),
    "map-generator": lambda p: p.map(square, (x for x in range(20))),
    "starmap": lambda p: p.starmap(add, [(1, 2), (3, 4), ("a", "b")]),
    "imap": lambda p: list(p.imap(square, range(50))),
    "imap-chunk4": lambda p: list(p.imap(square, range(50), chunksize=4)),
    "imap_unordered": lambda p: sorted(p.imap_unordered(square, range(50), chunksize=3)),
    "apply": lambda p: p.apply(add, (2,), {"b": 3}),
    "apply_async": lambda p: [p.apply_async(square, (i,)).get(DEADLOCK_TIMEOUT) for i in range(5)],
    "map_async": lambda p: p.map_async(square, range(30)).get(DEADLOCK_TIMEOUT),
    "starmap_async": lambda p: p.starmap_async(add, [(1, 1)] * 5).get(DEADLOCK_TIMEOUT),
    "nested-arrays": lambda p: p.map(describe, [0, 1, 5]),
    "big-args": lambda p: p.map(array_sum, [np.full(MiB, 2.0), np.ones(3)]),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_results_identical_to_multiprocessing(pools, call):
    reference, ours = pools
    assert _same(call(reference), call(ours))


def test_callbacks_run_with_the_result_or_the_error(pools):
    _, pool = pools
    got, errors = [], []
    both, failed = threading.Event(), threading.Event()

    def on_result(value):
        got.append(value)
        if len(got) == 2:
            both.set()

    pool.apply_async(square, (4,), callback=on_result)
    pool.map_async(square, [1, 2], callback=on_result)
    pool.apply_async(raise_value_error, (1,), error_callback=lambda e: (errors.append(e),
                                                                        failed.set()))
    assert both.wait(DEADLOCK_TIMEOUT) and failed.wait(DEADLOCK_TIMEOUT)
    assert sorted(map(str, got)) == ["16", "[1, 4]"]
    assert isinstance(errors[0], ValueError)


def test_worker_exception_carries_its_traceback(pools):
    _, pool = pools
    with pytest.raises(ValueError, match="bad input 3") as info:
        pool.apply(raise_value_error, (3,))
    cause = info.value.__cause__
    assert isinstance(cause, multiprocessing.pool.RemoteTraceback)
    assert "raise_value_error" in cause.tb and "the traceback names this line" in cause.tb
    with pytest.raises(ValueError):
        pool.map(raise_value_error, range(3))


def test_async_result_states_and_timeouts(pools):
    _, pool = pools
    result = pool.apply_async(sleep_then, (0.5,))
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.01)
    assert not result.ready()
    result.wait(DEADLOCK_TIMEOUT)
    assert result.ready() and result.successful() and result.get() == 0.5
    failing = pool.apply_async(raise_value_error, (0,))
    failing.wait(DEADLOCK_TIMEOUT)
    assert not failing.successful()
    it = pool.imap(sleep_then, [0.5])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.01)
    assert it.next(timeout=DEADLOCK_TIMEOUT) == 0.5
    with pytest.raises(StopIteration):
        it.next()


def test_unpicklable_argument_fails_like_multiprocessing(pools):
    reference, ours = pools
    errors = []
    for pool in (reference, ours):
        with pytest.raises(Exception) as info:
            pool.apply_async(square, (threading.Lock(),)).get(DEADLOCK_TIMEOUT)
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1])


def test_unpicklable_result_is_a_maybe_encoding_error(pools):
    _, pool = pools
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="lock"):
        pool.apply(return_unpicklable, (0,))
    assert pool.apply(square, (3,)) == 9          # and the pool goes on


@pytest.mark.parametrize("task, expected", [
    (raise_unloadable, "KeywordOnlyError|missing 1 required keyword-only"),
    (raise_unpicklable, "lock"),
    (return_unloadable, "refusing to unpickle"),
], ids=["exception-fails-to-unpickle", "exception-fails-to-pickle", "result-fails-to-unpickle"])
def test_answers_that_cannot_cross_become_errors_not_hangs(pools, task, expected):
    _, pool = pools
    result = pool.apply_async(task, (0,))
    result.wait(DEADLOCK_TIMEOUT)
    assert result.ready(), "the pool hung on an answer it could not move"
    with pytest.raises(Exception, match=expected):
        result.get()
    assert pool.apply(square, (2,)) == 4


@pytest.mark.parametrize("method", START_METHODS)
def test_lifecycle_close_join_terminate_and_not_running(method):
    ctx = multiprocessing.get_context(method)
    pool = shmpool.Pool(2, context=ctx)
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pending = pool.map_async(square, range(10))
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply_async(square, (1,))
    pool.join()
    assert pending.get(0) == [x * x for x in range(10)]

    with shmpool.Pool(1, context=ctx) as pool:
        stuck = pool.apply_async(forever, (0,))
    # the context manager terminated the pool: the unfinished task failed
    with pytest.raises(shmpool.BrokenPoolError):
        stuck.get(DEADLOCK_TIMEOUT)


@pytest.mark.parametrize("method", START_METHODS)
def test_initializer_and_maxtasksperchild_recycle_without_leaking(method):
    ctx = shmpool.get_context(method)
    with ctx.Pool(2, initializer=set_initialized, initargs=("ready",),
                  maxtasksperchild=2) as pool:
        store = testing.pool_store(pool)
        baseline = store.statistics()
        assert pool.map(get_initialized, range(4), chunksize=1) == ["ready"] * 4
        pids = {pool.apply(pid_of_worker) for _ in range(10)}
        assert len(pids) >= 5                    # every worker ran two tasks at most
        results = [pool.apply(make_array, (MiB,)) for _ in range(6)]
        del results
        # Workers forked while the results were held hold them too (the fork
        # rule) until they retire: let every one of them retire.
        for _ in range(8):
            pool.apply(pid_of_worker)
        store.raw.reap_dead_processes()
        after = testing.settled_statistics(store, baseline)
        assert (after.live_objects, after.in_use) == (baseline.live_objects, baseline.in_use)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        shmpool.Pool(0)
    with pytest.raises(ValueError):
        shmpool.Pool(1, maxtasksperchild=0)
    with pytest.raises(TypeError):
        shmpool.Pool(1, initializer=3)


def test_results_are_zero_copy_and_arguments_released(pools):
    _, pool = pools
    store = testing.pool_store(pool)
    baseline = store.statistics()
    results = pool.map(make_array, [8 * MiB] * 4)
    assert all(testing.in_store(store, r) for r in results)
    assert all(r.flags.writeable for r in results)       # copy-on-write
    # a result passed on as an argument is not copied again
    before = store.statistics().in_use
    assert pool.apply(array_sum, (results[0],)) == float(results[0].sum())
    assert store.statistics().in_use - before < MiB
    del results
    after = testing.settled_statistics(store, baseline)
    assert (after.live_objects, after.in_use) == (baseline.live_objects, baseline.in_use)


def _anonymous_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    raise AssertionError("no Anonymous line in smaps_rollup")


def test_parent_memory_does_not_grow_with_results_held(pools):
    _, pool = pools
    pool.map(make_array, [MiB] * 2)             # warm up the path
    before = _anonymous_kib()
    results = pool.map(make_array, [8 * MiB] * 32, chunksize=1)
    for r in results:
        assert r[-1] == r.size - 1              # touch every result
    grown = (_anonymous_kib() - before) * 1024
    received = sum(r.nbytes for r in results)
    assert received == 256 * MiB
    assert grown < 0.05 * received, f"parent grew {grown} bytes holding {received}"


def test_get_context_gives_shmpool_pool_and_stdlib_primitives():
    ctx = shmpool.get_context("spawn")
    assert ctx.get_start_method() == "spawn"
    assert ctx.Event is not None and ctx.Process is multiprocessing.get_context("spawn").Process
    with ctx.Pool(1) as pool:
        assert isinstance(pool, shmpool.Pool)
        assert pool.apply(square, (5,)) == 25


# -- kill matrix ---------------------------------------------------------------

def _assert_recovers(pool, baseline):
    assert pool.map(square, range(20)) == [x * x for x in range(20)]
    store = testing.pool_store(pool)
    store.raw.reap_dead_processes()
    testing.check_invariants(store)
    after = testing.settled_statistics(store, baseline)
    assert (after.live_objects, after.in_use) == (baseline.live_objects, baseline.in_use)


@pytest.mark.crash
@pytest.mark.parametrize("how", ["map", "imap", "apply_async"])
def test_worker_killed_in_task_fails_fast_and_pool_goes_on(mp_context, how):
    with shmpool.Pool(2, context=mp_context) as pool:
        baseline = testing.pool_store(pool).statistics()
        started = time.monotonic()
        with pytest.raises(shmpool.WorkerDiedError, match=r"worker process \d+ was killed by SIGKILL"):
            if how == "map":
                pool.starmap(die_on, [(x, 3) for x in range(8)], chunksize=1)
            elif how == "imap":
                list(pool.imap(square_or_die, range(8)))
            else:
                pool.apply_async(die_on, (1, 1)).get(DEADLOCK_TIMEOUT)
        assert time.monotonic() - started < 10
        _assert_recovers(pool, baseline)


@pytest.mark.crash
def test_task_queued_behind_a_dying_task_runs_on_another_worker(mp_context):
    """With one worker, the second task waits in that worker's pipe while the
    first runs.  The first kills its worker: it fails, and the second, never
    started, runs on the replacement instead of being lost or failed."""
    with shmpool.Pool(1, context=mp_context) as pool:
        first_pid = pool.apply(pid_of_worker)
        dying = pool.apply_async(die_on, (1, 1))
        behind = [pool.apply_async(square, (x,)) for x in range(3)]
        with pytest.raises(shmpool.WorkerDiedError):
            dying.get(DEADLOCK_TIMEOUT)
        assert [r.get(DEADLOCK_TIMEOUT) for r in behind] == [0, 1, 4]
        assert pool.apply(pid_of_worker) != first_pid


def square_or_die(x):
    return die_on(x, 5) ** 2


def build_in_store(n):
    out = shmpool.empty(n, dtype=np.float64)      # the pool's store, in a worker
    out[:] = 2.0
    return out


@pytest.mark.crash
@pytest.mark.parametrize("die", [testing.die_holding_store_lock, testing.die_while_writing_object],
                         ids=["holding-store-lock", "writing-result"])
def test_worker_killed_inside_the_store_fails_fast_and_nothing_leaks(mp_context, die):
    with shmpool.Pool(2, context=mp_context) as pool:
        baseline = testing.pool_store(pool).statistics()
        started = time.monotonic()
        with pytest.raises(shmpool.WorkerDiedError, match="SIGKILL"):
            pool.apply(die)
        assert time.monotonic() - started < 10
        _assert_recovers(pool, baseline)


def test_array_built_in_a_worker_is_returned_without_a_copy(pools):
    _, pool = pools
    store = testing.pool_store(pool)
    before = store.statistics().in_use
    result = pool.apply(build_in_store, (MiB,))
    assert result.sum() == 2.0 * MiB and result.flags.writeable
    # one 8 MiB object and a small frame: the array was sealed in place
    assert store.statistics().in_use - before < 8 * MiB + 64 * 1024
    usage = pool.statistics().held_by_process
    assert usage[os.getpid()][1] >= 8 * MiB      # the parent holds the result


@pytest.mark.crash
def test_worker_killed_at_random_moments_while_moving_results(mp_context):
    """SIGKILL from outside while workers keep writing results into the store
    (and so keep taking the allocator lock)."""
    rng = random.Random(7)
    with shmpool.Pool(2, context=mp_context) as pool:
        store = testing.pool_store(pool)
        baseline = store.statistics()
        for _ in range(5):
            pending = pool.map_async(make_array, [300 * 1024] * 400, chunksize=1)
            time.sleep(rng.uniform(0.01, 0.05))   # the random moment, not a sync
            os.kill(rng.choice(pool.statistics().worker_pids), signal.SIGKILL)
            try:
                pending.get(DEADLOCK_TIMEOUT)
            except shmpool.WorkerDiedError:
                pass                               # the expected outcome
            del pending
        _assert_recovers(pool, baseline)
