"""A process SIGKILLed while it may hold the arena lock stops nobody."""

import os
import random
import signal
import time

import numpy as np
import pytest

import shmpool
from shmpool import testing
from shmpool._allocator import AMBIGUOUS_HOLD, FreeListAllocator
from shmpool._arena import Arena

from conftest import DEADLOCK_TIMEOUT

pytestmark = pytest.mark.crash

KILLS = 50
#: Kills beyond KILLS allowed until one has landed inside the lock (the
#: takeover path is what the test is about; chance may miss it in 50).
EXTRA_KILLS = 100
#: After a kill the survivor gets the lock within this long: one poll to see
#: the dead pid, or AMBIGUOUS_HOLD if the victim died before writing it.
RECOVERY_BOUND = AMBIGUOUS_HOLD + 3.0


def _allocate_free_forever(arena, running):
    # Between lock holds the victim writes and checks its blocks, as real
    # users of the memory do; that also catches a block handed out twice.
    alloc = FreeListAllocator(arena)
    rng = random.Random(os.getpid())
    live = []
    running.set()
    while True:
        if live and (len(live) > 20 or rng.random() < 0.5):
            off, nbytes, byte = live.pop(rng.randrange(len(live)))
            assert arena.buf[off:off + nbytes] == bytes([byte]) * nbytes
            alloc.free(off)
        else:
            nbytes = rng.randrange(0, 20_000)
            off = alloc.try_allocate(nbytes)
            if off is not None:
                byte = rng.randrange(256)
                arena.buf[off:off + nbytes] = bytes([byte]) * nbytes
                live.append((off, nbytes, byte))


def _put_get_forever(store, running):
    # Small objects: most of the loop is store calls under the lock, so the
    # random kills often land while the victim holds it.
    rng = random.Random(os.getpid())
    running.set()
    while True:
        ref = store.put(np.full(rng.randrange(1, 2_000), 1.0))
        view = store.get(ref)
        store.release(ref)
        del view


def _kill_at_random_moment(ctx, target, args, rng):
    running = ctx.Event()
    child = ctx.Process(target=target, args=(*args, running))
    child.start()
    assert running.wait(DEADLOCK_TIMEOUT)
    time.sleep(rng.uniform(0, 0.02))       # the random moment of death, not a sync
    os.kill(child.pid, signal.SIGKILL)
    child.join(DEADLOCK_TIMEOUT)
    assert child.exitcode == -signal.SIGKILL


def _kill_until_a_takeover(ctx, target, args, rng, takeovers, recover):
    """KILLS kills, then more (at most EXTRA_KILLS) until one has landed
    inside the lock; *recover()* runs after each kill."""
    for kill in range(KILLS + EXTRA_KILLS):
        if kill >= KILLS and takeovers():
            return
        _kill_at_random_moment(ctx, target, args, rng)
        recover()


@pytest.mark.timeout(600)
def test_allocator_survives_holder_killed_at_random_moments(mp_context):
    arena = Arena.create(16 << 20)
    try:
        alloc = FreeListAllocator.format(arena)

        def recover():
            started = time.monotonic()
            off = alloc.try_allocate(1000)
            assert time.monotonic() - started < RECOVERY_BOUND
            assert off is not None
            alloc.free(off)
            with alloc.locked():
                alloc._check_invariants()

        _kill_until_a_takeover(mp_context, _allocate_free_forever, (arena,), random.Random(1234),
                               lambda: alloc.statistics().lock_takeovers, recover)
        # The test only proves something if kills landed inside the lock.
        assert alloc.statistics().lock_takeovers >= 1
    finally:
        arena.close()


@pytest.mark.timeout(600)
def test_store_survives_holder_killed_and_reclaims_its_objects(mp_context):
    with shmpool.ObjectStore(64 << 20) as store:
        raw = testing.raw_store(store)
        baseline = store.statistics()

        def recover():
            started = time.monotonic()
            ref = store.put(np.ones(1000))
            assert time.monotonic() - started < RECOVERY_BOUND
            store.release(ref)

        _kill_until_a_takeover(mp_context, _put_get_forever, (store,), random.Random(99),
                               lambda: store.statistics().lock_takeovers, recover)
        raw.reap_dead_processes()
        testing.check_invariants(store)
        after = store.statistics()
        assert after.lock_takeovers >= 1
        # Every object the victims held or were writing is back.
        assert (after.live_objects, after.in_use) == (baseline.live_objects, baseline.in_use)
