"""Soak: the Pool, the executor and a queue at once, under random worker kills.

For the whole run, the parent keeps tasks in flight on a Pool and on a
ProcessPoolExecutor, and consumes a queue fed by a producer process.  Sizes
are log-uniform from 0 B to 64 MiB, so every path is taken: in-band pickles,
frames in the store, the threshold's neighbourhood.  A killer thread SIGKILLs
a random worker of the pool or of the executor every fraction of a second.

What must hold at the end:
- every task ended, in a result or in the error a death gives
  (WorkerDiedError / BrokenProcessPool): none is lost, none hangs;
- every value received is exactly what its maker hashed (blake2b computed
  by the sender, checked on the received bytes);
- each store is back to its baseline once the results are dropped and the
  workers that inherited them through fork are gone (the pool's store: what
  is left is held by live workers only);
- the parent's private memory is flat: what it received lives in shared
  memory and is freed with the views.

The one-minute run (20 s under spawn and forkserver) is part of the main
CI run; ``--run-slow`` adds the 10-minute one.
"""

from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import os
import random
import signal
import threading
import time

import numpy as np
import pytest

import shmpool
from shmpool import testing

from conftest import DEADLOCK_TIMEOUT

MiB = 1 << 20
MAX_SIZE = 64 * MiB
#: Tasks each front end keeps in flight: enough to keep both workers busy
#: and the pipes full, few enough that 64 MiB values fit the stores.
IN_FLIGHT = 6
STORE_CAPACITY = 1024 * MiB


def _size(rng: random.Random) -> int:
    """Log-uniform over 0 B .. 64 MiB, with exact zero now and then."""
    if rng.random() < 0.05:
        return 0
    return min(MAX_SIZE, int(2 ** rng.uniform(0, 26)))


def _pattern(seed: int, nbytes: int) -> np.ndarray:
    """Bytes that differ between seeds everywhere (so a block reused by
    another value would show), computed in uint8 arithmetic: fast."""
    a = np.arange(nbytes, dtype=np.uint8)
    a *= np.uint8(2 * (seed % 128) + 1)
    a += np.uint8(seed % 251)
    return a


def _digest(buf) -> bytes:
    return hashlib.blake2b(memoryview(buf).cast("B"), digest_size=16).digest()


def make_value(seed: int, nbytes: int):
    """In a worker: a value and the hash of its bytes, as made."""
    a = _pattern(seed, nbytes)
    return _digest(a), a


def digest_of(a) -> bytes:
    """In a worker: the hash of an argument, as received."""
    return _digest(a)


def produce(queue, seed: int, stop) -> None:
    """A producer process: values of random sizes until *stop* is set, then None."""
    rng = random.Random(seed)
    i = 0
    while not stop.is_set():
        value = _pattern(seed + i, _size(rng))
        queue.put((_digest(value), value))
        i += 1
    queue.put(None)


class _Tally:
    def __init__(self) -> None:
        self.results = 0
        self.deaths = 0
        self.bytes = 0

    def check(self, got, expected_digest: bytes | None = None) -> None:
        if expected_digest is None:                   # (digest, value) from a maker
            expected_digest, value = got
            assert _digest(value) == expected_digest, "a received value changed"
            self.bytes += value.nbytes
        else:                                         # a digest of our argument
            assert got == expected_digest, "an argument arrived changed"
        self.results += 1


class _Killer(threading.Thread):
    """SIGKILLs a random worker of *pool* or of the current executor."""

    def __init__(self, rng: random.Random, pool, executors: list) -> None:
        super().__init__(daemon=True)
        self._rng = rng
        self._pool = pool
        self._executors = executors
        self.stop = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.stop.wait(self._rng.uniform(0.2, 1.0)):
            if self._rng.random() < 0.5:
                pids = list(self._pool.statistics().worker_pids)
            else:
                pids = list(self._executors[-1]._processes)
            if pids:
                try:
                    os.kill(self._rng.choice(pids), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass


def _soak(mp_context, seconds: float) -> None:
    rng = random.Random(20261204)
    tally = _Tally()
    executors = [shmpool.ProcessPoolExecutor(2, mp_context=mp_context,
                                             capacity=STORE_CAPACITY)]
    with shmpool.Pool(2, context=mp_context, capacity=STORE_CAPACITY) as pool:
        pool_store = testing.pool_store(pool)
        pool_baseline = pool_store.statistics()
        queue = shmpool.Queue(maxsize=4, ctx=mp_context, capacity=STORE_CAPACITY)
        queue_baseline = testing.queue_store(queue).statistics()
        producer_seed = 1_000_000
        stop_producing = mp_context.Event()
        producer = mp_context.Process(target=produce,
                                      args=(queue, producer_seed, stop_producing))
        producer.start()
        killer = _Killer(random.Random(rng.random()), pool, executors)
        pending: list = []           # (kind, handle, expected digest or None)
        memory_at_warmup = None
        started = time.monotonic()
        killer.start()
        try:
            while time.monotonic() - started < seconds:
                if memory_at_warmup is None and time.monotonic() - started > seconds / 5:
                    gc.collect()
                    memory_at_warmup = testing.private_bytes()
                # Keep IN_FLIGHT tasks on each front end.
                while sum(1 for p in pending if p[0] == "pool") < IN_FLIGHT:
                    seed = rng.randrange(1 << 30)
                    if rng.random() < 0.5:
                        handle = pool.apply_async(make_value, (seed, _size(rng)))
                        pending.append(("pool", handle, None))
                    else:
                        arg = _pattern(seed, _size(rng))
                        handle = pool.apply_async(digest_of, (arg,))
                        pending.append(("pool", handle, _digest(arg)))
                while sum(1 for p in pending if p[0] == "executor") < IN_FLIGHT:
                    seed = rng.randrange(1 << 30)
                    try:
                        future = executors[-1].submit(make_value, seed, _size(rng))
                    except concurrent.futures.process.BrokenProcessPool:
                        executors[-1].shutdown(wait=True)
                        executors.append(shmpool.ProcessPoolExecutor(
                            2, mp_context=mp_context, capacity=STORE_CAPACITY))
                        continue
                    pending.append(("executor", future, None))
                # One queue item per round.
                item = queue.get(timeout=DEADLOCK_TIMEOUT)
                assert item is not None, "the producer stopped early"
                tally.check(item)
                del item
                # Settle the oldest task.
                kind, handle, expected = pending.pop(0)
                _settle(kind, handle, expected, tally)
                del handle
            for kind, handle, expected in pending:
                _settle(kind, handle, expected, tally)
            pending.clear()
        finally:
            killer.stop.set()
            killer.join(DEADLOCK_TIMEOUT)
            stop_producing.set()
            while queue.get(timeout=DEADLOCK_TIMEOUT) is not None:
                pass                                  # what the producer had queued
            producer.join(DEADLOCK_TIMEOUT)
            for ex in executors:
                ex.shutdown(wait=True)
        gc.collect()
        growth = testing.private_bytes() - memory_at_warmup
        pool_store.raw.reap_dead_processes()
        settled = testing.settled_statistics(pool_store, pool_baseline)
        testing.check_invariants(pool_store)
        # What is still in the pool's store must be held by live workers
        # only: a worker forked while the parent held a result holds it too,
        # until it exits (the fork rule).  Nothing by the parent, nothing by
        # the dead.
        pool_holders = set(pool_store.raw.usage_by_process())
        workers = set(pool.statistics().worker_pids)
    # Workers forked while the parent held queue items hold them too, until
    # they exit (a fork child keeps what it inherited alive): so the queue's
    # store is checked once the pool's and the executors' workers are gone,
    # and their holds reaped.
    queue_store = testing.queue_store(queue)
    queue_store.raw.reap_dead_processes()
    queue_settled = testing.settled_statistics(queue_store, queue_baseline)
    held_by = queue_store.raw.usage_by_process()
    queue.close()
    queue.join_thread()
    print(f"soak {seconds:.0f}s: {tally.results} values checked "
          f"({tally.bytes / 2**30:.1f} GiB), {tally.deaths} tasks failed by "
          f"{killer.kills} kills, {len(executors)} executors, private memory "
          f"{growth / MiB:+.1f} MiB after warm-up")
    assert tally.results > 0 and killer.kills > 0
    assert pool_holders <= workers, (
        f"the pool's store kept objects ({settled.live_objects} live, "
        f"{settled.in_use - pool_baseline.in_use} bytes) held by {pool_holders - workers}, "
        f"which are not live workers")
    if mp_context.get_start_method() != "fork":            # nothing is inherited
        assert (settled.live_objects, settled.in_use) == (
            pool_baseline.live_objects, pool_baseline.in_use), "the pool's store kept objects"
    assert (queue_settled.live_objects, queue_settled.in_use) == (
        queue_baseline.live_objects, queue_baseline.in_use), (
        f"the queue's store kept objects: held by {held_by}")
    assert growth < 64 * MiB, f"the parent's private memory grew {growth / MiB:.0f} MiB"


def _settle(kind: str, handle, expected, tally: _Tally) -> None:
    """Wait for one task: its value, checked, or the error of a death."""
    try:
        got = (handle.get(DEADLOCK_TIMEOUT) if kind == "pool"
               else handle.result(DEADLOCK_TIMEOUT))
    except concurrent.futures.process.BrokenProcessPool:   # WorkerDiedError too
        tally.deaths += 1
        return
    tally.check(got, expected)


@pytest.mark.crash
@pytest.mark.timeout(60 + 3 * DEADLOCK_TIMEOUT)
def test_soak_one_minute(mp_context):
    _soak(mp_context, 60 if mp_context.get_start_method() == "fork" else 20)


@pytest.mark.crash
@pytest.mark.slow
@pytest.mark.timeout(600 + 3 * DEADLOCK_TIMEOUT)
def test_soak_ten_minutes(mp_context):
    _soak(mp_context, 600)
