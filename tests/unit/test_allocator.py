"""FreeListAllocator in one process: the fit search and the lock protocol."""

import contextlib
import threading

import pytest

from shmpool import ObjectStateError
from shmpool._allocator import BLOCK_OVERHEAD, FreeListAllocator, _size_class, block_size_for
from shmpool._arena import Arena
from shmpool._errors import BrokenArenaError, ClosedError

from conftest import DEADLOCK_TIMEOUT


@pytest.fixture
def alloc():
    arena = Arena.create(256 * 1024)
    try:
        yield FreeListAllocator.format(arena)
    finally:
        arena.close()


def _payload_for_block(size: int) -> int:
    nbytes = size - BLOCK_OVERHEAD
    assert block_size_for(nbytes) == size
    return nbytes


# -- fit ----------------------------------------------------------------------

def test_a_fitting_block_deep_in_the_exact_class_is_found(alloc):
    big, small = 3968, 2048                     # one size class, 64 * 2**5
    assert _size_class(big) == _size_class(small)
    fitting = alloc.try_allocate(_payload_for_block(big))
    alloc.try_allocate(0)                       # separators keep free blocks apart
    smaller = []
    for _ in range(20):
        smaller.append(alloc.try_allocate(_payload_for_block(small)))
        alloc.try_allocate(0)
    alloc.try_allocate(alloc.statistics().largest_free_block)    # the rest of the heap
    assert alloc.statistics().largest_free_block == 0
    # The fitting block goes in first: its class's list then holds it behind
    # twenty blocks that are too small, and no larger class holds anything.
    alloc.free(fitting)
    for off in smaller:
        alloc.free(off)
    assert alloc.try_allocate(_payload_for_block(big)) == fitting
    with alloc.locked():
        alloc._check_invariants()


def test_a_larger_class_is_taken_before_the_exact_class_is_searched(alloc):
    exact = alloc.try_allocate(_payload_for_block(2048))
    alloc.try_allocate(0)
    alloc.free(exact)
    # The heap's tail is a larger class: the request splits it in O(1).
    got = alloc.try_allocate(_payload_for_block(2048))
    assert got is not None and got > exact


# -- the lock -----------------------------------------------------------------

def test_an_exception_in_a_section_makes_the_next_holder_repair(alloc):
    off = alloc.try_allocate(1000)
    with pytest.raises(KeyboardInterrupt):
        with alloc.locked():
            alloc.free_locked(off)
            raise KeyboardInterrupt
    assert alloc.statistics().repairs == 0
    with alloc.locked():
        alloc._check_invariants()
    assert alloc.statistics().repairs == 1
    with alloc.locked():                        # clean since: no repair
        pass
    assert alloc.statistics().repairs == 1


def test_validation_errors_end_a_section_clean(alloc):
    with pytest.raises(ObjectStateError):
        with alloc.locked():
            alloc.free_locked(12345)
    with alloc.locked():
        pass
    assert alloc.statistics().repairs == 0


def test_unlock_not_consistent_leaves_the_repair_to_the_next_holder(alloc):
    alloc.lock()
    alloc.unlock(consistent=False)
    assert alloc.try_lock()
    alloc.unlock()
    assert alloc.statistics().repairs == 1


def test_lock_inside_a_running_section_raises_and_try_lock_says_no(alloc):
    refused = []

    def hook():                 # runs inside the allocator's own section
        with pytest.raises(RuntimeError, match="already holds") as info:
            alloc.lock()
        refused.append(info.value)
        assert alloc.try_lock() is False

    alloc.add_repair_hook(hook)
    alloc.lock()
    alloc.unlock(consistent=False)
    with alloc.locked():        # repairs, so runs the hook
        assert alloc.try_lock() is False
    assert len(refused) == 1


def test_lock_by_a_thread_whose_section_was_cut_repairs_and_goes_on(alloc):
    # As after an interrupt at the entry of __exit__: this thread holds the
    # lock, the dirty word is set, and no section of it is running.
    alloc.lock()
    alloc.lock()
    assert alloc.statistics().repairs == 1
    alloc.unlock()
    assert alloc.try_lock()     # released: the thread held it once, not twice
    alloc.unlock()


def test_unlock_by_a_thread_that_does_not_hold_it_raises(alloc):
    with pytest.raises(RuntimeError, match="does not hold it"):
        alloc.unlock()
    alloc.lock()
    errors = []

    def other():
        try:
            alloc.unlock()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(DEADLOCK_TIMEOUT)
    alloc.unlock()
    assert len(errors) == 1


@contextlib.contextmanager
def _held_by_another_thread(alloc):
    """Run the body while another thread holds the lock; yield that thread."""
    taken, done = threading.Event(), threading.Event()

    def holder():
        with alloc.locked():
            taken.set()
            done.wait(DEADLOCK_TIMEOUT)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert taken.wait(DEADLOCK_TIMEOUT)
        yield thread
    finally:
        done.set()
        thread.join(DEADLOCK_TIMEOUT)


def test_try_lock_never_blocks_on_another_thread(alloc):
    with _held_by_another_thread(alloc):
        assert alloc.try_lock() is False
    assert alloc.try_lock()
    alloc.unlock()


def test_a_holder_past_the_timeout_is_named_and_never_robbed(alloc, monkeypatch):
    from shmpool import _allocator
    monkeypatch.setattr(_allocator, "LOCK_TIMEOUT", 0.3)
    monkeypatch.setattr(_allocator, "LOCK_SLICE", 0.05)
    with _held_by_another_thread(alloc) as thread:
        with pytest.raises(BrokenArenaError, match=rf"held by pid \d+ \(thread {thread.native_id}\)"):
            alloc.lock()
        assert alloc.statistics().repairs == 0
    with alloc.locked():
        alloc._check_invariants()
    assert (alloc.statistics().repairs, alloc.statistics().lock_takeovers) == (0, 0)


def test_a_closed_arena_refuses_the_lock():
    arena = Arena.create(256 * 1024)
    alloc = FreeListAllocator.format(arena)
    arena.close()
    with pytest.raises(ClosedError):
        alloc.lock()
    with pytest.raises(ClosedError):
        alloc.try_lock()
