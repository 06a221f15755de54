"""shmpool.ProcessPoolExecutor against concurrent.futures.ProcessPoolExecutor."""

import asyncio
import concurrent.futures
import gc
import multiprocessing
import os
import pickle
import signal
import socket
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

import shmpool
from shmpool import testing

from conftest import DEADLOCK_TIMEOUT, START_METHODS

MiB = 1 << 20
NON_FORK = [m for m in START_METHODS if m != "fork"]


# -- task functions (module level, for spawn) --------------------------------

def square(x):
    return x * x


def add(a, b=0):
    return a + b


def make_array(nbytes):
    return np.arange(nbytes // 4, dtype=np.float32)


def array_sum(arr):
    return float(arr.sum())


def raise_value_error(x):
    raise ValueError(f"bad input {x}")  # the traceback names this line


def pid_of_worker(_=None):
    return os.getpid()


def return_unpicklable(_=None):
    return threading.Lock()


def return_unloadable(_=None):
    return [testing.FailsToUnpickle(), np.ones(MiB)]


class KeywordOnlyError(Exception):
    """Pickles, but cannot be unpickled (keyword-only __init__, no __reduce__)."""

    def __init__(self, *, code):
        super().__init__(f"code {code}")


def raise_unloadable(_=None):
    raise KeywordOnlyError(code=7)


def sigkill_self(_=None):
    os.kill(os.getpid(), signal.SIGKILL)


def sigkill_behind_gate():
    behind_gate(None)        # woken (so the Event stays usable), then killed
    sigkill_self()


def forever(_=None):
    threading.Event().wait()          # until the worker is terminated


def fail_initializer():
    raise ValueError("initializer failed on purpose")


# A gate the parent opens: workers get a multiprocessing Event (and a queue
# to say they started) through the initializer, pickled while the worker
# starts, which multiprocessing allows.
_gate = _started = None


def set_gate(event, started=None):
    global _gate, _started
    _gate, _started = event, started


def behind_gate(x):
    if _started is not None:
        _started.put(x)
    if not _gate.wait(DEADLOCK_TIMEOUT):
        raise TimeoutError("the test never opened the gate")
    return x


def pid_behind_gate(x):
    behind_gate(x)
    return os.getpid()


# -- fixtures ----------------------------------------------------------------

@pytest.fixture(scope="module", params=START_METHODS)
def executors(request):
    """The standard library's executor and shmpool's, same start method."""
    ctx = multiprocessing.get_context(request.param)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as reference, \
            shmpool.ProcessPoolExecutor(2, mp_context=ctx) as ours:
        yield reference, ours


@pytest.fixture
def gated(mp_context):
    """``(executor, gate)``: one worker whose tasks ``behind_gate`` wait
    until ``gate.set()``.  The gate is opened at the end in any case."""
    gate = mp_context.Event()
    executor = shmpool.ProcessPoolExecutor(1, mp_context=mp_context, initializer=set_gate,
                                           initargs=(gate,))
    try:
        yield executor, gate
    finally:
        gate.set()
        executor.shutdown(wait=True)


def _same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


CALLS = {
    "submit": lambda e: e.submit(square, 7).result(DEADLOCK_TIMEOUT),
    "submit-kwargs": lambda e: e.submit(add, 2, b=3).result(DEADLOCK_TIMEOUT),
    "map": lambda e: list(e.map(square, range(50))),
    "map-two-iterables": lambda e: list(e.map(add, range(10), range(0, 100, 10))),
    "map-chunk7": lambda e: list(e.map(square, range(50), chunksize=7)),
    "map-empty": lambda e: list(e.map(square, [])),
    "map-generator": lambda e: list(e.map(square, (x for x in range(20)), chunksize=3)),
    "big-args": lambda e: list(e.map(array_sum, [np.full(MiB, 2.0), np.ones(3)])),
    "big-results": lambda e: list(e.map(make_array, [4 * MiB, 100])),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_results_identical_to_concurrent_futures(executors, call):
    reference, ours = executors
    assert _same(call(reference), call(ours))


def test_futures_are_concurrent_futures_and_exceptions_carry_tracebacks(executors):
    reference, ours = executors
    future = ours.submit(raise_value_error, 3)
    assert isinstance(future, concurrent.futures.Future)
    with pytest.raises(ValueError, match="bad input 3") as info:
        future.result(DEADLOCK_TIMEOUT)
    ref = reference.submit(raise_value_error, 3).exception(DEADLOCK_TIMEOUT)
    assert type(info.value.__cause__) is type(ref.__cause__)      # _RemoteTraceback
    assert "the traceback names this line" in info.value.__cause__.tb
    it = ours.map(raise_value_error, [1])
    with pytest.raises(ValueError):
        next(it)


def test_as_completed_wait_and_done_callbacks(executors):
    _, executor = executors
    futures = [executor.submit(square, i) for i in range(10)]
    done_in_callback = threading.Semaphore(0)
    seen = []
    for future in futures:
        future.add_done_callback(lambda f: (seen.append(f.result()), done_in_callback.release()))
    got = sorted(f.result() for f in concurrent.futures.as_completed(futures, DEADLOCK_TIMEOUT))
    assert got == [i * i for i in range(10)]
    done, not_done = concurrent.futures.wait(futures, DEADLOCK_TIMEOUT)
    assert done == set(futures) and not not_done
    for _ in futures:
        assert done_in_callback.acquire(timeout=DEADLOCK_TIMEOUT)
    assert sorted(seen) == got
    failing = executor.submit(raise_value_error, 0)
    done, _ = concurrent.futures.wait([failing], DEADLOCK_TIMEOUT,
                                      return_when=concurrent.futures.FIRST_EXCEPTION)
    assert done == {failing} and isinstance(failing.exception(), ValueError)


def test_asyncio_run_in_executor(executors):
    _, executor = executors

    async def main():
        loop = asyncio.get_running_loop()
        squares = await asyncio.gather(*(loop.run_in_executor(executor, square, i)
                                         for i in range(5)))
        big = await loop.run_in_executor(executor, make_array, 8 * MiB)
        with pytest.raises(ValueError, match="bad input"):
            await loop.run_in_executor(executor, raise_value_error, 1)
        return squares, big

    squares, big = asyncio.run(asyncio.wait_for(main(), DEADLOCK_TIMEOUT))
    assert squares == [0, 1, 4, 9, 16]
    assert testing.in_store(testing.pool_store(executor), big) and big.flags.writeable
    assert big[-1] == big.size - 1


def test_results_are_zero_copy_copy_on_write_and_arguments_released(executors):
    _, executor = executors
    store = testing.pool_store(executor)
    baseline = store.statistics()
    results = list(executor.map(make_array, [8 * MiB] * 4))
    assert all(testing.in_store(store, r) for r in results)
    assert all(r.flags.writeable for r in results)       # copy-on-write
    # a result passed on as an argument is not copied again
    before = store.statistics().in_use
    assert executor.submit(array_sum, results[0]).result(DEADLOCK_TIMEOUT) == float(results[0].sum())
    assert store.statistics().in_use - before < MiB
    del results
    after = testing.settled_statistics(store, baseline)
    assert (after.live_objects, after.in_use) == (baseline.live_objects, baseline.in_use)


def test_pickling_failures_match_concurrent_futures(executors):
    reference, ours = executors
    for call in (lambda e: e.submit(square, threading.Lock()),     # argument
                 lambda e: e.submit(return_unpicklable)):          # result
        expected = call(reference).exception(DEADLOCK_TIMEOUT)
        got = call(ours).exception(DEADLOCK_TIMEOUT)
        assert type(got) is type(expected), (got, expected)
    assert ours.submit(square, 3).result(DEADLOCK_TIMEOUT) == 9


@pytest.mark.parametrize("task", [return_unloadable, raise_unloadable],
                         ids=["result-fails-to-unpickle", "exception-fails-to-unpickle"])
def test_answer_that_cannot_be_unpickled_fails_its_future_only(executors, task):
    _, executor = executors
    future = executor.submit(task)
    with pytest.raises(BrokenProcessPool, match="cannot unpickle the answer"):
        future.result(DEADLOCK_TIMEOUT)
    assert executor.submit(square, 2).result(DEADLOCK_TIMEOUT) == 4   # not broken


# -- cancelling and shutting down ---------------------------------------------

def test_cancel_until_a_worker_takes_the_task_releases_arguments(gated):
    executor, gate = gated
    store = testing.pool_store(executor)
    baseline = store.statistics()
    running = executor.submit(behind_gate, "first")
    queued = [executor.submit(array_sum, np.full(MiB, float(i))) for i in range(3)]
    assert store.statistics().live_objects >= baseline.live_objects + 3   # held arguments
    assert not running.cancel()                    # a worker has it
    assert all(f.cancel() for f in queued[:2])     # still queued: cancellable
    gate.set()
    assert running.result(DEADLOCK_TIMEOUT) == "first"
    assert queued[2].result(DEADLOCK_TIMEOUT) == float(2 * MiB)
    assert all(f.cancelled() for f in queued[:2])
    done, _ = concurrent.futures.wait(queued[:2], DEADLOCK_TIMEOUT)   # waiters notified
    assert done == set(queued[:2])
    with pytest.raises(concurrent.futures.CancelledError):
        queued[0].result(0)
    after = testing.settled_statistics(store, baseline)
    assert (after.live_objects, after.in_use) == (baseline.live_objects, baseline.in_use)


def test_shutdown_cancel_futures_cancels_the_queue_and_finishes_the_rest(gated):
    executor, gate = gated
    running = executor.submit(behind_gate, 1)
    queued = [executor.submit(behind_gate, i) for i in range(20)]
    executor.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    gate.set()
    executor.shutdown(wait=True)
    assert running.result(0) == 1
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(square, 1)
    executor.shutdown()                             # idempotent


@pytest.mark.parametrize("method", START_METHODS)
def test_shutdown_without_wait_and_a_dropped_executor_finish_their_tasks(method):
    ctx = multiprocessing.get_context(method)
    executor = shmpool.ProcessPoolExecutor(2, mp_context=ctx)
    futures = [executor.submit(square, i) for i in range(20)]
    results = executor.map(square, range(10))
    executor.shutdown(wait=False)
    assert [f.result(DEADLOCK_TIMEOUT) for f in futures] == [i * i for i in range(20)]
    assert list(results) == [i * i for i in range(10)]

    executor = shmpool.ProcessPoolExecutor(2, mp_context=ctx)
    results = executor.map(make_array, [MiB] * 6)
    pending = executor.submit(square, 12)
    del executor
    gc.collect()
    assert pending.result(DEADLOCK_TIMEOUT) == 144
    assert [r.nbytes for r in results] == [MiB] * 6
    # the no_leaked_names fixture then checks that both stores were freed


@pytest.mark.parametrize("method", START_METHODS)
def test_a_shut_down_executor_never_writes_to_descriptors_reused_since(method):
    """Its supervisor's wake-up pipe closes with its thread; a later
    ``shutdown`` or the executor's collection must not write a wake-up byte
    into whatever now has those descriptor numbers (a worker's pipe, once)."""
    ctx = multiprocessing.get_context(method)
    first = shmpool.ProcessPoolExecutor(2, mp_context=ctx)
    assert first.submit(square, 2).result(DEADLOCK_TIMEOUT) == 4
    first.shutdown(wait=True)
    # Take every low descriptor number again, with sockets: a stray write to
    # either end of a pair can be read at the other.
    pairs = [socket.socketpair() for _ in range(64)]
    try:
        first.shutdown(wait=False, cancel_futures=True)
        del first
        gc.collect()
        for a, b in pairs:
            for end in (a, b):
                end.setblocking(False)
                with pytest.raises(BlockingIOError):
                    end.recv(1)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_map_timeout_raises_and_cancels_the_calls_not_started(mp_context):
    gate, started = mp_context.Event(), mp_context.SimpleQueue()
    with shmpool.ProcessPoolExecutor(1, mp_context=mp_context, initializer=set_gate,
                                     initargs=(gate, started)) as executor:
        results = executor.map(behind_gate, range(5), timeout=0.2)
        with pytest.raises(concurrent.futures.TimeoutError):
            next(results)
        gate.set()
        assert executor.submit(square, 4).result(DEADLOCK_TIMEOUT) == 16
    ran = []
    while not started.empty():          # every worker has exited: all is in
        ran.append(started.get())
    started.close()
    assert ran == [0]                   # the first call was running; the rest never ran


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        shmpool.ProcessPoolExecutor(0)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        shmpool.ProcessPoolExecutor(1, initializer=3)
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        shmpool.ProcessPoolExecutor(1, max_tasks_per_child=0)
    with pytest.raises(TypeError, match="max_tasks_per_child must be an integer"):
        shmpool.ProcessPoolExecutor(1, max_tasks_per_child=1.5)
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        with shmpool.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as e:
            e.map(square, [1], chunksize=0)
    with pytest.raises(TypeError, match="cannot be passed between processes"):
        with shmpool.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as e:
            pickle.dumps(e)


# -- workers: on demand, max_tasks_per_child, initializer ---------------------

@pytest.mark.parametrize("method", NON_FORK)
def test_workers_start_on_demand_outside_fork(method):
    ctx = multiprocessing.get_context(method)
    gate, started = ctx.Event(), ctx.SimpleQueue()
    with shmpool.ProcessPoolExecutor(4, mp_context=ctx, initializer=set_gate,
                                     initargs=(gate, started)) as executor:
        try:
            pids = {executor.submit(pid_of_worker).result(DEADLOCK_TIMEOUT) for _ in range(5)}
            assert len(pids) == 1                  # one worker, reused while idle
            futures = [executor.submit(pid_behind_gate, i) for i in range(6)]
            for _ in range(4):                     # four run at once: up to max_workers
                started.get()
            gate.set()
            assert len({f.result(DEADLOCK_TIMEOUT) for f in futures} | pids) == 4
        finally:
            gate.set()
    started.close()


@pytest.mark.parametrize("method", NON_FORK)
def test_max_tasks_per_child_replaces_workers(method):
    ctx = multiprocessing.get_context(method)
    with shmpool.ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=2) as executor:
        pids = [executor.submit(pid_of_worker).result(DEADLOCK_TIMEOUT) for _ in range(6)]
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
    with shmpool.ProcessPoolExecutor(2, mp_context=ctx, max_tasks_per_child=3) as executor:
        assert list(executor.map(square, range(6))) == [i * i for i in range(6)]
        pids = set(executor.map(pid_of_worker, range(12)))
        assert len(pids) >= 4                     # at most 3 tasks each


def test_max_tasks_per_child_rules_on_start_methods():
    with pytest.raises(ValueError, match="incompatible with the 'fork'"):
        shmpool.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"),
                                    max_tasks_per_child=3)
    with shmpool.ProcessPoolExecutor(1, max_tasks_per_child=3) as executor:
        assert executor._mp_context.get_start_method() == "spawn"     # the stdlib's rule
        assert executor.submit(square, 5).result(DEADLOCK_TIMEOUT) == 25


def test_failing_initializer_breaks_the_executor(mp_context):
    executor = shmpool.ProcessPoolExecutor(2, mp_context=mp_context,
                                           initializer=fail_initializer)
    try:
        with pytest.raises(BrokenProcessPool, match="exited with code 1"):
            executor.submit(square, 2).result(DEADLOCK_TIMEOUT)
        with pytest.raises(BrokenProcessPool):
            executor.submit(square, 3)
    finally:
        executor.shutdown(wait=True)


# -- a dead worker breaks the executor ----------------------------------------

@pytest.mark.crash
def test_sigkilled_worker_fails_every_pending_future_and_frees_everything(mp_context):
    gate = mp_context.Event()
    executor = shmpool.ProcessPoolExecutor(2, mp_context=mp_context, initializer=set_gate,
                                           initargs=(gate,))
    store = testing.pool_store(executor)
    try:
        done = executor.submit(square, 3)
        assert done.result(DEADLOCK_TIMEOUT) == 9
        pending = [executor.submit(forever, np.full(MiB, 1.0))]        # one worker busy
        killer = executor.submit(sigkill_behind_gate)                   # the other, waiting
        pending += [executor.submit(forever, np.full(MiB, float(i))) for i in range(5)]
        gate.set()                                                      # now it dies
        started = time.monotonic()
        for future in [*pending, killer]:
            with pytest.raises(BrokenProcessPool, match="was killed by SIGKILL") as info:
                future.result(DEADLOCK_TIMEOUT)
            assert isinstance(info.value, shmpool.WorkerDiedError)
        assert time.monotonic() - started < 10
        with pytest.raises(BrokenProcessPool, match="the pool is broken"):
            executor.submit(square, 2)
        assert executor._broken and done.result(0) == 9
    finally:
        executor.shutdown(wait=True)
    assert store.closed and not executor._processes
    # the no_leaked_names fixture checks /dev/shm


@pytest.mark.crash
@pytest.mark.parametrize("die", [testing.die_holding_store_lock, testing.die_while_writing_object],
                         ids=["holding-store-lock", "writing-result"])
def test_worker_killed_inside_the_store_breaks_the_executor_fast(mp_context, die):
    executor = shmpool.ProcessPoolExecutor(2, mp_context=mp_context)
    try:
        started = time.monotonic()
        with pytest.raises(shmpool.WorkerDiedError, match="SIGKILL"):
            executor.submit(die).result(DEADLOCK_TIMEOUT)
        assert time.monotonic() - started < 10
        with pytest.raises(BrokenProcessPool):
            list(executor.map(square, range(3)))
    finally:
        executor.shutdown(wait=True)
