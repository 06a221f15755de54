"""Segregated free-list allocator whose whole state lives inside the arena.

Every attached process runs this code against the same bytes, so nothing
of the allocator is kept in Python objects: any process can allocate, and
any process can free what another allocated.

Allocator header (native u64, at arena offset ``HEADER_SIZE``)::

    +0   lock holder pid (0 = nobody)   +8   lock acquisitions (sequence)
    +16  in_use (bytes of used blocks)  +24  peak in_use
    +32  live blocks                    +40  bitmap of non-empty classes
    +48  heap start                     +56  heap end
    +64  lock takeovers (dead holders)  +72..127 reserved
    +128 NCLASSES free-list heads (block offsets, 0 = empty)

Blocks tile ``[heap start, heap end)`` exactly.  Each is a multiple of
ALIGNMENT bytes and starts with a 64-byte header; the payload follows, so
payloads are 64-byte aligned::

    +0 tag = size | ALLOCATED      +8 next free   +16 prev free   (free blocks)
    ... payload (size - BLOCK_OVERHEAD bytes) ...
    size-8: footer = tag           (lets the next block find this one)

A free block of size ``s`` sits in class ``floor(log2(s / 64))``; a bitmap
finds the first non-empty class above the request in O(1).  Freed blocks
coalesce with free neighbours at once (boundary tags).

Crash consistency.  A process may be SIGKILLed anywhere, also while it
holds the lock.  Each shared word goes from its old value to its new one in
a single store (``Arena.words``; never ``struct.pack_into``, which zeroes
the word before it writes the value).  Every update is ordered so that
walking the *header tags* from heap start always sees a valid tiling: a
split writes the remainder's header before shrinking the block; a merge
rewrites the first header of the run last.  Footers, lists, bitmap and
counters are derived state, and ``repair()`` rebuilds all of them from that
walk.

Invariants (checked by ``_check_invariants``):

- blocks tile the heap; sizes are multiples of 64 and at least MIN_BLOCK;
- every footer equals its header;
- no two free blocks are adjacent (free space is coalesced);
- each free block is in exactly the list of its class, lists are doubly
  linked, and the bitmap marks exactly the non-empty classes;
- in_use and live blocks equal the sums over allocated blocks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from dataclasses import dataclass

from . import _posix
from ._arena import HEADER_SIZE, Arena
from ._errors import BrokenArenaError, ObjectStateError, StoreFullError

__all__ = ["FreeListAllocator", "AllocatorStatistics", "BLOCK_OVERHEAD", "ALIGNMENT"]

ALIGNMENT = 64
BLOCK_HEADER = 64
BLOCK_OVERHEAD = BLOCK_HEADER + 8          # header + footer
MIN_BLOCK = 128
NCLASSES = 48
ALLOCATED = 1

#: How long one wait on the semaphore lasts before the waiter looks at the
#: holder.  Shorter notices a dead holder sooner; longer wakes less often.
LOCK_POLL = 0.05
#: A holder pid of 0 with the semaphore taken for this long means the holder
#: died between taking the semaphore and writing its pid (or between clearing
#: it and releasing).  No live process holds the lock for more than a few
#: microseconds, so this is far above any real hold.
AMBIGUOUS_HOLD = 5.0
#: A live holder that keeps the lock this long is treated as broken (it was
#: stopped, or its pid was reused); the waiter raises instead of hanging.
LOCK_TIMEOUT = 60.0
#: Exact-class candidates inspected before moving to a larger class.
FIT_SCAN_LIMIT = 16

# Offsets below are in bytes and multiples of 8; every shared word is read
# and written as ``arena.words[offset >> 3]`` (see _arena for why not struct).
_H_HOLDER, _H_SEQ, _H_IN_USE, _H_PEAK, _H_LIVE, _H_BITMAP, _H_START, _H_END = (
    HEADER_SIZE + 8 * i for i in range(8))
_H_TAKEOVERS = HEADER_SIZE + 64
_H_HEADS = HEADER_SIZE + 128
ALLOC_HEADER_END = _H_HEADS + 8 * NCLASSES
HEAP_START = (ALLOC_HEADER_END + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
_STEAL_BYTE = 0        # byte of the segment whose fcntl lock arbitrates steals


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


# The pid, cached: os.getpid() is a system call, and a pending SIGKILL is
# delivered on the way out of one.  Made between taking the semaphore and
# recording the holder, it would put the victim's death exactly where its
# holder pid is not yet written, the case that costs waiters AMBIGUOUS_HOLD.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def _size_class(size: int) -> int:
    return min((size >> 6).bit_length() - 1, NCLASSES - 1)


def block_size_for(nbytes: int) -> int:
    """Size of the block that holds a payload of *nbytes*."""
    return max(MIN_BLOCK, _round_up(nbytes + BLOCK_OVERHEAD, ALIGNMENT))


@dataclass(frozen=True)
class AllocatorStatistics:
    capacity: int
    """Bytes the heap spans (the arena less its headers)."""
    in_use: int
    """Bytes of allocated blocks, headers included."""
    peak_in_use: int
    """Largest ``in_use`` ever reached."""
    live_blocks: int
    """Allocated blocks."""
    largest_free_block: int
    """Largest payload one allocation could get right now."""
    committed: int
    """Bytes of the segment backed by reserved memory."""
    lock_takeovers: int
    """Times a waiter took the lock over from a holder that had died."""


class FreeListAllocator:
    """Hand out and take back 64-byte-aligned byte ranges of an Arena.

    Process- and thread-safe.  ``try_allocate`` and ``free`` take the arena
    lock themselves; ``*_locked`` methods expect the caller to
    hold it (``with allocator.locked():``), which lets the store do several
    steps atomically.  Nobody holds the lock across user code or a blocking
    call.  A waiter that finds the holder dead takes the lock over, repairs
    the state from the boundary tags, and goes on; if it cannot tell, it
    raises BrokenArenaError within LOCK_TIMEOUT.  Does not own *arena*.
    """

    def __init__(self, arena: Arena) -> None:
        self._arena = arena
        self._words = arena.words
        self._sem = arena.lock
        self._steal_mutex = threading.Lock()
        self._repair_hooks: list = []

    @classmethod
    def format(cls, arena: Arena) -> "FreeListAllocator":
        """Lay out an empty heap in a freshly created arena."""
        if arena.capacity - HEAP_START < MIN_BLOCK:
            raise ValueError(f"arena of {arena.capacity} bytes is too small for a heap")
        alloc = cls(arena)
        for off in range(HEADER_SIZE, ALLOC_HEADER_END, 8):
            alloc._set(off, 0)
        end = arena.capacity // ALIGNMENT * ALIGNMENT
        alloc._set(_H_START, HEAP_START)
        alloc._set(_H_END, end)
        alloc._write_free_block(HEAP_START, end - HEAP_START)
        alloc._push_free(HEAP_START, end - HEAP_START)
        return alloc

    def add_repair_hook(self, hook) -> None:
        """Call *hook()* (with the lock held) after state is repaired."""
        self._repair_hooks.append(hook)

    # -- locking -----------------------------------------------------------

    def _get(self, off: int) -> int:
        return self._words[off >> 3]

    def _set(self, off: int, value: int) -> None:
        # One store: a process killed here leaves the old value or the new.
        self._words[off >> 3] = value

    def _on_acquired(self) -> None:
        self._set(_H_HOLDER, _pid)
        self._set(_H_SEQ, self._get(_H_SEQ) + 1)

    def try_lock(self) -> bool:
        """Take the lock if it is free right now; never blocks."""
        if self._sem.try_acquire():
            self._on_acquired()
            return True
        return False

    def lock(self) -> None:
        """Take the lock, taking it over from a dead holder if need be.

        Raises:
            BrokenArenaError: the holder is alive but kept the lock for
                LOCK_TIMEOUT seconds.
        """
        if self.try_lock():
            return
        started = time.monotonic()
        seen = (self._get(_H_HOLDER), self._get(_H_SEQ))
        seen_since = started
        while True:
            if self._sem.acquire(LOCK_POLL):
                self._on_acquired()
                return
            now = time.monotonic()
            state = (self._get(_H_HOLDER), self._get(_H_SEQ))
            if state != seen:
                seen, seen_since = state, now
            holder = state[0]
            if holder and not _posix.process_is_alive(holder):
                if self._steal(state):
                    return
            elif not holder and now - seen_since >= AMBIGUOUS_HOLD:
                if self._steal(state):
                    return
            if now - started >= LOCK_TIMEOUT:
                raise BrokenArenaError(
                    f"the store lock has been held by pid {holder} for "
                    f"{now - started:.0f}s; a lock is never held that long, so "
                    f"the holder is stopped or stuck (kill it or recreate the store)")

    def _steal(self, seen: tuple[int, int]) -> bool:
        """Take over the lock from a holder that will never release it."""
        fd = self._arena_fd()
        with self._steal_mutex:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, _STEAL_BYTE)
            try:
                if self._sem.try_acquire():          # released meanwhile
                    self._on_acquired()
                    return True
                if (self._get(_H_HOLDER), self._get(_H_SEQ)) != seen:
                    return False                     # somebody else took over
                self._on_acquired()                  # the semaphore's 0 is ours now
                self._set(_H_TAKEOVERS, self._get(_H_TAKEOVERS) + 1)
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, _STEAL_BYTE)
        self.repair()
        for hook in self._repair_hooks:
            hook()
        return True

    def _arena_fd(self) -> int:
        return self._arena.fileno()

    def unlock(self) -> None:
        self._set(_H_HOLDER, 0)
        self._sem.release()

    @contextlib.contextmanager
    def locked(self):
        """``with allocator.locked():`` runs the body holding the arena lock."""
        self.lock()
        try:
            yield self
        finally:
            self.unlock()

    # -- free lists --------------------------------------------------------

    def _set_footer(self, off: int, size: int, tag: int) -> None:
        # The last block needs no footer (no block follows to read it), and
        # writing one would touch, and so commit, the far end of the arena.
        if off + size < self._get(_H_END):
            self._set(off + size - 8, tag)

    def _write_free_block(self, off: int, size: int) -> None:
        self._set(off, size)
        self._set_footer(off, size, size)

    def _push_free(self, off: int, size: int) -> None:
        cls = _size_class(size)
        head_at = _H_HEADS + 8 * cls
        head = self._get(head_at)
        self._set(off + 8, head)
        self._set(off + 16, 0)
        if head:
            self._set(head + 16, off)
        self._set(head_at, off)
        self._set(_H_BITMAP, self._get(_H_BITMAP) | (1 << cls))

    def _unlink_free(self, off: int, size: int) -> None:
        cls = _size_class(size)
        nxt, prev = self._get(off + 8), self._get(off + 16)
        if prev:
            self._set(prev + 8, nxt)
        else:
            self._set(_H_HEADS + 8 * cls, nxt)
            if not nxt:
                self._set(_H_BITMAP, self._get(_H_BITMAP) & ~(1 << cls))
        if nxt:
            self._set(nxt + 16, prev)

    def _find_fit(self, size: int) -> int:
        cls = _size_class(size)
        off = self._get(_H_HEADS + 8 * cls)
        for _ in range(FIT_SCAN_LIMIT):
            if not off:
                break
            if self._get(off) >= size:
                return off
            off = self._get(off + 8)
        above = self._get(_H_BITMAP) >> (cls + 1)
        if not above:
            return 0
        cls += (above & -above).bit_length()
        return self._get(_H_HEADS + 8 * cls)

    # -- allocate and free (lock held) -------------------------------------

    def allocate_locked(self, nbytes: int) -> int | None:
        """Reserve a payload of *nbytes*; return its offset, or None if no
        free block fits or ``/dev/shm`` has no memory left for it."""
        size = block_size_for(nbytes)
        off = self._find_fit(size)
        if not off:
            return None
        free_size = self._get(off)
        if not self._arena.commit_up_to(off + size + BLOCK_HEADER):
            return None
        self._unlink_free(off, free_size)
        rest = free_size - size
        if rest >= MIN_BLOCK:
            self._write_free_block(off + size, rest)     # walk still sees one block
            self._set(off, size | ALLOCATED)             # now: used + free
            self._push_free(off + size, rest)
        else:
            size = free_size
            self._set(off, size | ALLOCATED)
        self._set_footer(off, size, size | ALLOCATED)
        in_use = self._get(_H_IN_USE) + size
        self._set(_H_IN_USE, in_use)
        if in_use > self._get(_H_PEAK):
            self._set(_H_PEAK, in_use)
        self._set(_H_LIVE, self._get(_H_LIVE) + 1)
        return off + BLOCK_HEADER

    def free_locked(self, offset: int) -> None:
        """Give back the payload at *offset* and coalesce with free neighbours.

        Raises:
            ObjectStateError: *offset* is not an allocated payload.
        """
        off = offset - BLOCK_HEADER
        start, end = self._get(_H_START), self._get(_H_END)
        if off < start or off >= end or off % ALIGNMENT:
            raise ObjectStateError(f"offset {offset} is not a payload of this arena")
        tag = self._get(off)
        size = tag & ~ALLOCATED
        # A tag is trusted only if it describes a whole allocated block: the
        # offset may be stale, its old header since overwritten by a payload.
        if (not tag & ALLOCATED or size < MIN_BLOCK or size % ALIGNMENT
                or off + size > end
                or (off + size < end and self._get(off + size - 8) != tag)):
            raise ObjectStateError(
                f"offset {offset} is not an allocated block (freed twice, or "
                f"never returned by this allocator)")
        # Mark the block free before merging: if it merges into a free block
        # before it, this header is no longer a block start, and must not
        # still read "allocated" (a second free would be accepted).  The walk
        # sees adjacent free blocks until the merge; repair() coalesces them.
        self._set(off, size)
        self._set(_H_IN_USE, self._get(_H_IN_USE) - size)
        self._set(_H_LIVE, self._get(_H_LIVE) - 1)
        first, total = off, size
        nxt = off + size
        if nxt < end:
            ntag = self._get(nxt)
            if not ntag & ALLOCATED:
                self._unlink_free(nxt, ntag)
                total += ntag
        if off > start:
            ptag = self._get(off - 8)
            if not ptag & ALLOCATED:
                self._unlink_free(off - ptag, ptag)
                first, total = off - ptag, total + ptag
        self._set_footer(first, total, total)
        self._set(first, total)          # the one write that frees and merges
        self._push_free(first, total)

    # -- self-locking API --------------------------------------------------

    def try_allocate(self, nbytes: int) -> int | None:
        """Reserve *nbytes*; return the payload offset, or None if nothing fits
        right now.  Waits only for the lock."""
        self.check_size(nbytes)
        with self.locked():
            return self.allocate_locked(nbytes)

    def free(self, offset: int) -> None:
        with self.locked():
            self.free_locked(offset)

    def check_size(self, nbytes: int) -> None:
        """Raise unless a payload of *nbytes* could ever fit in this heap."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if block_size_for(nbytes) > self.heap_size:
            raise StoreFullError(
                f"cannot allocate {nbytes} bytes: the store holds at most "
                f"{self.heap_size - BLOCK_OVERHEAD} bytes in one object "
                f"(pass a larger capacity=)")

    @property
    def heap_end(self) -> int:
        return self._get(_H_END)

    @property
    def heap_size(self) -> int:
        return self._get(_H_END) - self._get(_H_START)

    def payload_size(self, offset: int) -> int:
        """Usable bytes of the allocated payload at *offset*."""
        return (self._get(offset - BLOCK_HEADER) & ~ALLOCATED) - BLOCK_OVERHEAD

    # -- statistics, repair, invariants ------------------------------------

    def statistics(self) -> AllocatorStatistics:
        largest = 0
        bitmap = self._get(_H_BITMAP)
        if bitmap:
            cls = bitmap.bit_length() - 1
            off = self._get(_H_HEADS + 8 * cls)
            while off:
                largest = max(largest, self._get(off) - BLOCK_OVERHEAD)
                off = self._get(off + 8)
        return AllocatorStatistics(
            capacity=self.heap_size,
            in_use=self._get(_H_IN_USE),
            peak_in_use=self._get(_H_PEAK),
            live_blocks=self._get(_H_LIVE),
            largest_free_block=largest,
            committed=self._arena.committed,
            lock_takeovers=self._get(_H_TAKEOVERS),
        )

    def _walk(self):
        """Yield ``(offset, size, allocated)`` for every block, by header tags."""
        off, end = self._get(_H_START), self._get(_H_END)
        while off < end:
            tag = self._get(off)
            size = tag & ~ALLOCATED
            if size < MIN_BLOCK or size % ALIGNMENT or off + size > end:
                raise BrokenArenaError(
                    f"corrupt block tag {tag:#x} at offset {off}: the store's "
                    f"memory was overwritten (recreate the store)")
            yield off, size, bool(tag & ALLOCATED)
            off += size

    def blocks(self):
        """Yield ``(payload offset, allocated)`` for every block, in order.
        Call with the lock held."""
        for off, _, used in self._walk():
            yield off + BLOCK_HEADER, used

    def repair(self) -> None:
        """Rebuild footers, free lists, bitmap and counters from the header
        tags, merging free neighbours.  Call with the lock held."""
        blocks: list[list] = []
        for off, size, used in self._walk():
            if blocks and not used and not blocks[-1][2]:
                blocks[-1][1] += size
            else:
                blocks.append([off, size, used])
        for cls in range(NCLASSES):
            self._set(_H_HEADS + 8 * cls, 0)
        self._set(_H_BITMAP, 0)
        in_use = live = 0
        for off, size, used in blocks:
            tag = size | ALLOCATED if used else size
            self._set_footer(off, size, tag)
            self._set(off, tag)
            if used:
                in_use += size
                live += 1
            else:
                self._push_free(off, size)
        self._set(_H_IN_USE, in_use)
        self._set(_H_LIVE, live)
        if in_use > self._get(_H_PEAK):
            self._set(_H_PEAK, in_use)

    def _check_invariants(self) -> None:
        """Walk the heap and assert every invariant in the module docstring."""
        free_blocks: dict[int, int] = {}
        in_use = live = 0
        total = 0
        prev_free = False
        for off, size, used in self._walk():
            assert (off + BLOCK_HEADER) % ALIGNMENT == 0, f"misaligned block {off}"
            if off + size < self.heap_end:
                footer = self._get(off + size - 8)
                assert footer == (size | ALLOCATED if used else size), f"footer of {off}"
            total += size
            if used:
                in_use += size
                live += 1
            else:
                assert not prev_free, f"free block at {off} not coalesced"
                free_blocks[off] = size
            prev_free = not used
        assert total == self.heap_size, "blocks do not tile the heap"
        assert in_use == self._get(_H_IN_USE), "in_use out of step"
        assert live == self._get(_H_LIVE), "live block count out of step"
        listed = {}
        bitmap = self._get(_H_BITMAP)
        for cls in range(NCLASSES):
            off, prev = self._get(_H_HEADS + 8 * cls), 0
            assert bool(off) == bool(bitmap >> cls & 1), f"bitmap bit {cls}"
            while off:
                assert off in free_blocks, f"list {cls} holds non-free block {off}"
                assert off not in listed, f"block {off} listed twice"
                assert _size_class(free_blocks[off]) == cls, f"block {off} in class {cls}"
                assert self._get(off + 16) == prev, f"prev link of {off}"
                listed[off] = cls
                prev, off = off, self._get(off + 8)
        assert len(listed) == len(free_blocks), "free block missing from lists"
