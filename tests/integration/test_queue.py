"""shmpool's queues between processes: what travels where, values at put
time, Pool workers, exactly-once delivery under load, and kills."""

import hashlib
import math
import multiprocessing
import os
import queue as stdlib_queue
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import shmpool
from shmpool import testing

from conftest import DEADLOCK_TIMEOUT

MiB = 1 << 20


# -- children (module level, for spawn) ------------------------------------

def _put_items(q, items, done):
    for item in items:
        q.put(item)
    done.set()


def _payload(producer: int, seq: int, nbytes: int):
    """A deterministic item of *nbytes* bytes: an array or a bytes object."""
    seed = np.random.default_rng(producer * 1_000_003 + seq).integers(0, 256, 4096, np.uint8)
    data = np.resize(seed, nbytes)
    return data if seq % 2 == 0 else data.tobytes()


def _digest(payload) -> bytes:
    return hashlib.blake2b(memoryview(payload).cast("B"), digest_size=16).digest()


def _stress_producer(q, producer, sizes):
    for seq, nbytes in enumerate(sizes):
        payload = _payload(producer, seq, nbytes)
        q.put((producer, seq, _digest(payload), payload))


def _stress_consumer(q, out):
    received = []
    while (item := q.get(timeout=DEADLOCK_TIMEOUT)) is not None:
        producer, seq, digest, payload = item
        received.append((producer, seq, _digest(payload) == digest, len(memoryview(payload).cast("B"))))
        del item, payload
    out.put(received)


def _hold_items(q, count, holding, out):
    held = [q.get(timeout=DEADLOCK_TIMEOUT) for _ in range(count)]
    out.put([float(a[0]) for a in held])
    holding.set()
    while True:
        time.sleep(3600)      # hold the views until killed


def _put_forever(q, nbytes, started):
    seq = 0
    while True:
        q.put(np.full(nbytes // 8, seq, dtype=np.int64))
        seq += 1
        if seq == 2:
            started.set()


_worker_queue = None


def _remember_queue(q):
    global _worker_queue
    _worker_queue = q


def _put_from_worker(n):
    _worker_queue.put((n, np.full(MiB // 8, n, dtype=np.int64)))
    return n


# -- what travels where ------------------------------------------------------

def test_small_items_ride_in_the_pipe_and_big_ones_in_the_store():
    q = shmpool.Queue()
    baseline = q.statistics()
    q.put(b"x" * 3000)                  # fits a 4 KiB record: in the pipe
    assert q.statistics().live_objects == baseline.live_objects
    q.put(b"y" * 5000)                  # does not: in the store until got
    q.put(np.arange(MiB, dtype=np.uint8))
    assert q.statistics().live_objects == baseline.live_objects + 2
    assert q.get(timeout=DEADLOCK_TIMEOUT) == b"x" * 3000
    assert q.get(timeout=DEADLOCK_TIMEOUT) == b"y" * 5000
    arr = q.get(timeout=DEADLOCK_TIMEOUT)
    assert testing.in_store(testing.queue_store(q), arr) and arr.flags.writeable
    np.testing.assert_array_equal(arr, np.arange(MiB, dtype=np.uint8))
    del arr
    stats = testing.settled_statistics(testing.queue_store(q), baseline)
    assert (stats.live_objects, stats.in_use) == (baseline.live_objects, baseline.in_use)
    q.close()
    q.join_thread()


@pytest.mark.parametrize("kind", ["Queue", "JoinableQueue", "SimpleQueue"])
@pytest.mark.parametrize("readonly", [False, True], ids=["cow", "readonly"])
def test_big_items_from_a_child_are_views_of_the_store(mp_context, kind, readonly):
    q = getattr(shmpool.get_context(mp_context.get_start_method()), kind)(readonly=readonly)
    done = mp_context.Event()
    items = [np.arange(8 * MiB // 8, dtype=np.float64), "small", np.zeros(0)]
    child = mp_context.Process(target=_put_items, args=(q, items, done))
    child.start()
    try:
        big, small, empty = (q.get() if kind == "SimpleQueue" else q.get(timeout=DEADLOCK_TIMEOUT)
                             for _ in range(3))
        assert testing.in_store(testing.queue_store(q), big)
        assert big.flags.writeable != readonly
        np.testing.assert_array_equal(big, items[0])
        assert small == "small" and empty.shape == (0,)
        assert done.wait(DEADLOCK_TIMEOUT)
    finally:
        child.join(DEADLOCK_TIMEOUT)
    assert child.exitcode == 0
    q.close()


def test_the_value_put_is_the_value_got():
    """The standard library pickles in a feeder thread, later: changing an
    object after put() can change what arrives.  Here put() takes the value."""
    q = shmpool.Queue()
    arr, lst = np.zeros(1000), [1, 2]
    big = np.zeros(MiB)
    for item in (arr, lst, big):
        q.put(item)
    arr[:] = 7
    lst.append(3)
    big[:] = 7
    assert not q.get(timeout=DEADLOCK_TIMEOUT).any()
    assert q.get(timeout=DEADLOCK_TIMEOUT) == [1, 2]
    assert not q.get(timeout=DEADLOCK_TIMEOUT).any()
    q.close()


def test_unpicklable_item_is_reported_not_put_and_queue_goes_on(capsys):
    q = shmpool.Queue(maxsize=1)
    q.put(lambda: None)                  # reported on stderr, as by the stdlib feeder
    assert "Traceback" in capsys.readouterr().err
    assert q.qsize() == 0 and not q.full()
    q.put("next")
    assert q.get(timeout=DEADLOCK_TIMEOUT) == "next"
    q.close()


def test_queue_reaches_pool_workers_through_the_initializer(mp_context):
    q = shmpool.Queue(ctx=mp_context)
    with shmpool.Pool(2, initializer=_remember_queue, initargs=(q,),
                      context=mp_context) as pool:
        assert sorted(pool.map(_put_from_worker, range(12))) == list(range(12))
        got = dict(q.get(timeout=DEADLOCK_TIMEOUT) for _ in range(12))
    assert sorted(got) == list(range(12))
    for n, arr in got.items():
        assert arr.flags.writeable and (arr == n).all()
    q.close()


def test_store_is_freed_when_the_queue_is_dropped_with_items_in_it():
    before = testing.live_names()
    q = shmpool.Queue()
    for i in range(4):
        q.put(np.full(MiB, i))
    assert testing.queue_store(q).statistics().live_objects >= 4
    q.close()
    q.join_thread()
    del q
    assert not testing.leaked_names(since=before, timeout=DEADLOCK_TIMEOUT)


# -- exactly once, under load --------------------------------------------------

def _stress_sizes(rng: random.Random, count: int) -> list[int]:
    """Sizes from 0 B to 4 MiB, spread evenly on a log scale (so small,
    in-pipe items and big, in-store items are both common)."""
    top = math.log(4 * MiB + 1)
    return [int(math.exp(rng.uniform(0, top))) - 1 for _ in range(count)]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_four_producers_two_consumers_deliver_each_item_exactly_once(method):
    ctx = multiprocessing.get_context(method)
    rng = random.Random(20261122)
    producers, consumers, per_producer = 4, 2, 2500
    sizes = [_stress_sizes(rng, per_producer) for _ in range(producers)]
    q = shmpool.Queue(ctx=ctx)
    baseline = q.statistics()
    out = ctx.SimpleQueue()
    procs = [ctx.Process(target=_stress_consumer, args=(q, out)) for _ in range(consumers)]
    procs += [ctx.Process(target=_stress_producer, args=(q, p, sizes[p]))
              for p in range(producers)]
    for proc in procs:
        proc.start()
    for proc in procs[consumers:]:
        proc.join(DEADLOCK_TIMEOUT * 4)
        assert proc.exitcode == 0
    for _ in range(consumers):
        q.put(None)
    received = [item for _ in range(consumers) for item in out.get()]
    for proc in procs[:consumers]:
        proc.join(DEADLOCK_TIMEOUT)
        assert proc.exitcode == 0
    keys = [(producer, seq) for producer, seq, _, _ in received]
    assert len(keys) == producers * per_producer
    assert set(keys) == {(p, s) for p in range(producers) for s in range(per_producer)}
    assert all(ok for _, _, ok, _ in received), "an item arrived with other content"
    assert all(nbytes == sizes[p][s] for p, s, _, nbytes in received)
    stats = testing.settled_statistics(testing.queue_store(q), baseline)
    assert (stats.live_objects, stats.in_use) == (baseline.live_objects, baseline.in_use)
    assert stats.fallbacks == 0
    q.close()
    q.join_thread()
    out.close()


# -- kills ---------------------------------------------------------------------

@pytest.mark.crash
def test_consumer_killed_while_holding_items_releases_them(mp_context):
    """A consumer dies holding 48 MiB of views in a 64 MiB store: its holds
    are reaped when the space is needed, and the survivors go on."""
    q = shmpool.Queue(ctx=mp_context, capacity=64 * MiB)
    baseline = q.statistics()
    holding, out = mp_context.Event(), mp_context.SimpleQueue()
    consumer = mp_context.Process(target=_hold_items, args=(q, 3, holding, out), daemon=True)
    consumer.start()
    try:
        for i in range(3):
            q.put(np.full(2 * MiB, i, dtype=np.int64))        # 16 MiB each
        assert out.get() == [0.0, 1.0, 2.0]
        assert holding.wait(DEADLOCK_TIMEOUT)
        os.kill(consumer.pid, signal.SIGKILL)
    finally:
        consumer.join(DEADLOCK_TIMEOUT)
    assert consumer.exitcode == -signal.SIGKILL
    for i in range(3, 6):             # needs the dead consumer's 48 MiB back
        q.put(np.full(2 * MiB, i, dtype=np.int64))
        assert q.get(timeout=DEADLOCK_TIMEOUT)[0] == i
    stats = testing.settled_statistics(testing.queue_store(q), baseline)
    assert (stats.live_objects, stats.in_use) == (baseline.live_objects, baseline.in_use)
    q.close()
    out.close()


@pytest.mark.crash
def test_producer_killed_mid_put_leaves_no_partial_item(mp_context):
    """Producers putting 4 MiB arrays are SIGKILLed at random moments: every
    item got is whole, the queue goes on, and reaping returns the store to
    its baseline (objects being written when the producer died are aborted)."""
    q = shmpool.Queue(ctx=mp_context)
    baseline = q.statistics()
    rng = random.Random(7)
    for _ in range(4):
        started = mp_context.Event()
        producer = mp_context.Process(target=_put_forever, args=(q, 4 * MiB, started),
                                      daemon=True)
        producer.start()
        assert started.wait(DEADLOCK_TIMEOUT)
        for _ in range(rng.randrange(1, 4)):
            arr = q.get(timeout=DEADLOCK_TIMEOUT)
            assert (arr == arr[0]).all()
        time.sleep(rng.uniform(0, 0.01))      # a random moment, not a wait for an event
        os.kill(producer.pid, signal.SIGKILL)
        producer.join(DEADLOCK_TIMEOUT)
        while True:                           # what it managed to send is whole
            try:
                arr = q.get(timeout=0.5)
            except stdlib_queue.Empty:
                break
            assert (arr == arr[0]).all()
        del arr
    q.put("still works")
    assert q.get(timeout=DEADLOCK_TIMEOUT) == "still works"
    store = testing.queue_store(q)
    store.raw.reap_dead_processes()
    testing.check_invariants(store)
    stats = testing.settled_statistics(store, baseline)
    assert (stats.live_objects, stats.in_use) == (baseline.live_objects, baseline.in_use)
    q.close()


QUEUE_OWNER = """
import multiprocessing, sys
import numpy as np
import shmpool

def consume(q):
    while True:
        q.get()

if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    q = shmpool.Queue(ctx=ctx)
    child = ctx.Process(target=consume, args=(q,), daemon=True)
    child.start()
    for i in range(4):
        q.put(np.full(1 << 20, float(i)))
    print(child.pid, flush=True)
    while True:
        q.put(np.full(1 << 20, 1.0))
"""


@pytest.mark.crash
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_queue_owner_killed_mid_run_leaves_no_name(method, tmp_path):
    script = tmp_path / "queue_owner.py"
    script.write_text(QUEUE_OWNER)
    before = testing.live_names()
    proc = subprocess.Popen([sys.executable, str(script), method], stdout=subprocess.PIPE,
                            text=True)
    try:
        consumer = int(proc.stdout.readline())
    finally:
        proc.kill()                            # SIGKILL the owner mid-put
        proc.wait(DEADLOCK_TIMEOUT)
        proc.stdout.close()
    os.kill(consumer, signal.SIGKILL)          # its consumer would wait for items forever
    assert not testing.leaked_names(since=before, timeout=DEADLOCK_TIMEOUT / 2)
