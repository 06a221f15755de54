"""A process SIGKILLed in the middle of one store to the arena breaks nothing.

The random kills of ``test_lock_holder_killed`` land inside a store only
rarely.  Here each store that an allocate or a free makes is, in turn, made
to kill its own process at the moment that matters: after the store has
begun and before the new value is in place.  The value handed to the store
is an int-like object whose ``__index__`` sends SIGKILL, and a store
converts its value with ``__index__``.  A store that clears its target first
(``struct.pack_into`` does) leaves a zero word behind: a zero block tag that
the survivor's ``repair()`` cannot walk past.  The survivor must instead take
the lock over, repair, and find every invariant holding.
"""

import multiprocessing
import os
import signal

import pytest

from shmpool._allocator import FreeListAllocator
from shmpool._arena import Arena

from conftest import DEADLOCK_TIMEOUT

pytestmark = pytest.mark.crash

ARENA_CAPACITY = 256 * 1024
#: More stores than any one allocate or free makes.
MAX_STORES = 40


class _KilledOnConversion:
    """Stands for an int; converting it to one SIGKILLs this process."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        return self.value            # not reached


def _lay_out(alloc: FreeListAllocator, scenario: str) -> tuple[str, int]:
    """Prepare the heap for *scenario*; return the victim's operation."""
    a, b, c, _ = (alloc.try_allocate(n) for n in (1000, 3000, 2000, 500))
    if scenario == "free merging both neighbours":
        alloc.free(a)
        alloc.free(c)
        return "free", b
    if scenario == "free without a free neighbour":
        return "free", c
    if scenario == "allocate splitting a free block":
        return "allocate", 100
    if scenario == "allocate taking a whole free block":
        alloc.free(b)
        return "allocate", 3000
    raise AssertionError(scenario)


def _die_in_store(arena: Arena, operation: tuple[str, int], nth: int) -> None:
    """Child: run *operation* holding the lock, SIGKILLed inside its *nth*
    store (from 1).  If it makes fewer stores, exit 0, still holding the lock."""
    alloc = FreeListAllocator(arena)
    alloc.lock()
    store = alloc._set
    count = 0

    def dying_store(off: int, value: int) -> None:
        nonlocal count
        count += 1
        store(off, _KilledOnConversion(value) if count == nth else value)

    alloc._set = dying_store
    kind, arg = operation
    if kind == "free":
        alloc.free_locked(arg)
    else:
        alloc.allocate_locked(arg)
    os._exit(0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", [
    "free merging both neighbours",
    "free without a free neighbour",
    "allocate splitting a free block",
    "allocate taking a whole free block",
])
def test_holder_killed_inside_a_store(scenario):
    ctx = multiprocessing.get_context("fork")
    for nth in range(1, MAX_STORES + 1):
        arena = Arena.create(ARENA_CAPACITY)
        try:
            alloc = FreeListAllocator.format(arena)
            operation = _lay_out(alloc, scenario)
            victim = ctx.Process(target=_die_in_store, args=(arena, operation, nth))
            victim.start()
            victim.join(DEADLOCK_TIMEOUT)
            assert victim.exitcode in (0, -signal.SIGKILL), victim.exitcode
            with alloc.locked():                 # a takeover: the victim held it
                alloc._check_invariants()
            assert alloc.statistics().lock_takeovers == 1
            off = alloc.try_allocate(1000)
            assert off is not None
            alloc.free(off)
        finally:
            arena.close()
        if victim.exitcode == 0:
            assert nth > 5, f"{scenario}: only {nth - 1} stores were interrupted"
            return
    raise AssertionError(f"{scenario} made more than {MAX_STORES} stores")
