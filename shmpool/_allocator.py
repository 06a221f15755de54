"""Segregated free-list allocator whose whole state lives inside the arena.

Every attached process runs this code against the same bytes, so nothing
of the allocator is kept in Python objects: any process can allocate, and
any process can free what another allocated.

Allocator header (native u64, at arena offset ``HEADER_SIZE``)::

    +0   dirty: pid of the process in a locked section, 0 after a clean one
    +8   lock acquisitions (sequence)
    +16  in_use (bytes of used blocks)  +24  peak in_use
    +32  live blocks                    +40  bitmap of non-empty classes
    +48  heap start                     +56  heap end
    +64  holders that died holding the lock     +72  repairs
    +80..127 reserved
    +128 NCLASSES free-list heads (block offsets, 0 = empty)

Blocks tile ``[heap start, heap end)`` exactly.  Each is a multiple of
ALIGNMENT bytes and starts with a 64-byte header; the payload follows, so
payloads are 64-byte aligned::

    +0 tag = size | ALLOCATED      +8 next free   +16 prev free   (free blocks)
    ... payload (size - BLOCK_OVERHEAD bytes) ...
    size-8: footer = tag           (lets the next block find this one)

A free block of size ``s`` sits in class ``floor(log2(s / 64))``.  A request
takes the head of the first non-empty class above its own (a bitmap lookup:
any block there fits); only when there is none does it search its own class,
all of it.  So if a free block can hold a request, the request gets it.
Freed blocks coalesce with free neighbours at once (boundary tags).

The lock protocol
-----------------

The lock is a robust, process-shared, error-checking pthread mutex in the
arena's header (``Arena.mutex``), used only through this class.

Why a robust mutex rather than a System V semaphore taken with
``SEM_UNDO``: the robust-futex list reports a dead owner to the next locker
(EOWNERDEAD), which is exactly a lock whose holder's death the kernel
reports; a stalled live holder is simply waited for; the uncontended path
makes no system call (``semop`` is one each way); and the mutex lives in
the nameless segment, so it has no name and no id: nothing to leak after
SIGKILL of a whole process group, nothing to sweep, nothing another user or
another PID namespace can collide with (a SysV semaphore outlives its
processes as a kernel object that only ``IPC_RMID`` removes).

- **Liveness is the kernel's to judge.**  A thread that dies holding the
  mutex (its process SIGKILLed, or exiting) is on the kernel's robust-futex
  list, so the next locker gets EOWNERDEAD: it marks the mutex consistent,
  counts a takeover, repairs, and goes on.  A live holder is never robbed,
  however long it stalls (SIGSTOP, a GIL held elsewhere): waiters wait.  One
  that keeps the lock LOCK_TIMEOUT seconds with no other acquisition in
  between makes the waiter raise BrokenArenaError naming it; the lock is
  never taken from it.
- **The dirty word.**  A locker writes its pid into it just after taking the
  mutex, and ``unlock()`` clears it just before releasing, after a clean
  section.  A locker that finds it set (a holder died, or an exception left
  a section mid-change) runs ``repair()`` and then every repair hook before
  anything else.  ``locked()`` ends clean when its body raised nothing, or
  raised one of CLEAN_EXITS: those are raised by validation *before any
  shared write*, and every locked method must keep it so.  Anything else
  (KeyboardInterrupt, MemoryError, BrokenArenaError, an assertion) leaves
  the word set.
- **Crash consistency.**  Each shared word goes from its old value to its
  new one in a single store (``Arena.words``; never ``struct.pack_into``,
  which zeroes the word before it writes the value).  Every update is
  ordered so that walking the *header tags* from heap start always sees a
  valid tiling: a split writes the remainder's header before shrinking the
  block; a merge rewrites the first header of the run last.  Footers,
  lists, bitmap and counters are derived state, and ``repair()`` rebuilds
  them from that walk.  So a section cut anywhere is repairable.
- **Waiting.**  A waiter blocks in C with the GIL released, in LOCK_SLICE
  steps, returning to Python between them so that signal handlers run and
  Ctrl-C works.  A signal never ends a wait early and is never an error.
- **Exceptions from signal handlers** (KeyboardInterrupt) fire at a
  function's entry, at a loop's edge or after a C call.  Every step that
  takes or gives back the mutex runs under ``except BaseException``: if this
  thread then holds it (the futex word carries the owner's thread id), the
  handler marks it consistent, leaves the dirty word set and releases it.
  So an interrupt right after the C call returned, inside ``repair()`` or
  inside ``unlock()`` leaves neither a held lock nor unrepaired state, and
  ``try_allocate``/``free``, which make no call between their section's end
  and the release, leave nothing either.  One gap remains, in callers: the
  entry of ``__exit__``/``unlock()`` after a section's body (and, before
  Python 3.11, the bytecodes between ``lock()`` returning and the caller's
  ``try``).  An interrupt there leaves the lock with this live thread, the
  dirty word set.  The thread's next ``lock()`` finds that it holds the lock
  while no section of its own runs (no frame of lock-holding code further
  up its stack), takes the earlier section as abandoned, repairs, and goes
  on holding the lock for its caller.  Until then others wait, and after
  LOCK_TIMEOUT fail naming this process; if the thread ends first, the
  kernel hands the lock on.  A second interrupt while the first one is
  letting go of the lock ends the same way.
- **By construction**, the failures of the earlier semaphore and its
  pid/timer guessing cannot happen: no waiter decides that a holder is dead,
  so a stalled holder is never robbed and no repair runs under a live
  writer; the mutex is a single owner word, so a stall inside ``unlock()``
  cannot leave it "released twice"; no pid is ever compared with a live
  process, so a reused pid misleads nobody; and the mutex has no name or id,
  so nothing outlives the processes or collides with another user's.
- **Threads** of one process are ordered by the mutex itself (it is per
  thread): no ``threading.Lock`` is needed.  The thread that locks must
  unlock.  ``lock()`` inside a running section of the same thread raises
  RuntimeError; a GC finalizer (which may run inside a section) must use
  ``try_lock()``, which then returns False.
- **fork.**  Nobody forks while holding the lock in the forking thread,
  except a ``before`` fork hook (``os.register_at_fork``) that takes it
  with ``lock_across_fork()`` so that nothing changes across the fork: the
  parent's ``after_in_parent`` hook releases it (``unlock_after_fork()``);
  the child, which does not own it (the owner is the parent's thread),
  must not, and locks like any other process.  In between, this thread's
  ``lock()`` raises RuntimeError, so another fork hook cannot use the
  store.  glibc gives the child an empty robust list.
- **PID namespaces.**  The owner is recorded as a thread id of the holder's
  namespace; processes that share a store should share one, or two threads
  with equal ids could each take the other for itself.

Invariants (checked by ``_check_invariants``):

- blocks tile the heap; sizes are multiples of 64 and at least MIN_BLOCK;
- every footer equals its header;
- no two free blocks are adjacent (free space is coalesced);
- each free block is in exactly the list of its class, lists are doubly
  linked, and the bitmap marks exactly the non-empty classes;
- in_use and live blocks equal the sums over allocated blocks.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from dataclasses import dataclass

from ._arena import HEADER_SIZE, MUTEX_OFFSET, Arena
from ._errors import (
    BrokenArenaError,
    ClosedError,
    NotARefError,
    ObjectNotFoundError,
    ObjectStateError,
    StoreFullError,
)
from ._posix import FUTEX_TID_MASK

__all__ = ["FreeListAllocator", "AllocatorStatistics", "BLOCK_OVERHEAD", "ALIGNMENT",
           "CLEAN_EXITS"]

ALIGNMENT = 64
BLOCK_HEADER = 64
BLOCK_OVERHEAD = BLOCK_HEADER + 8          # header + footer
MIN_BLOCK = 128
NCLASSES = 48
ALLOCATED = 1

#: How long one blocking wait for the lock lasts before the waiter returns
#: to Python (signal handlers, Ctrl-C, the LOCK_TIMEOUT check).  glibc
#: restarts a futex wait that a signal interrupts, so this bounds how late a
#: handler runs.  Shorter reacts sooner; longer wakes a waiter less often.
LOCK_SLICE = 0.1
#: A live holder that keeps the lock this long, with nobody else taking it
#: in between, is stopped or stuck: the waiter raises BrokenArenaError.
#: Real holds last microseconds; this stays far above any stall a healthy
#: system shows (a SIGSTOP by a debugger or a shell, a swapped-out holder).
LOCK_TIMEOUT = 60.0
#: Exceptions after which a locked section still ends clean: every locked
#: method raises them from validation, before its first shared write.
CLEAN_EXITS = (ObjectNotFoundError, ObjectStateError, StoreFullError, ClosedError,
               NotARefError)

# Offsets below are in bytes and multiples of 8; every shared word is read
# and written as ``arena.words[offset >> 3]`` (see _arena for why not struct).
_H_DIRTY, _H_SEQ, _H_IN_USE, _H_PEAK, _H_LIVE, _H_BITMAP, _H_START, _H_END = (
    HEADER_SIZE + 8 * i for i in range(8))
_W_DIRTY, _W_SEQ = _H_DIRTY >> 3, _H_SEQ >> 3
#: The mutex's futex word, as a u32 index: its low bits are the owner's
#: thread id (glibc's layout, see _posix.FUTEX_TID_MASK).
_W_FUTEX = MUTEX_OFFSET >> 2
_H_TAKEOVERS = HEADER_SIZE + 64
_H_REPAIRS = HEADER_SIZE + 72
_H_HEADS = HEADER_SIZE + 128
ALLOC_HEADER_END = _H_HEADS + 8 * NCLASSES
HEAP_START = (ALLOC_HEADER_END + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT

_TAKEN = (0, errno.EOWNERDEAD)
_LET_GO_ATTEMPTS = 5
_BUSY = (errno.EBUSY, errno.ETIMEDOUT)


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


# The pid, cached (os.getpid() is a system call); it goes in the dirty word.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


#: Files whose code runs with the lock held.  A frame of theirs further up
#: the stack than the current call's own means a section is running there.
def _section_on_stack(frame) -> bool:
    """Whether a locked section may be running in this thread below *frame*
    (the caller of ``lock()``): a frame of lock-holding code beyond the
    innermost run of them, which is the current call itself.  A finalizer
    that runs inside a section is called through a frame of another module
    (``weakref``, ``multiprocessing.util``), which separates the two runs."""
    while frame is not None and frame.f_code.co_filename in _HOLDER_FILES:
        frame = frame.f_back
    while frame is not None:
        if frame.f_code.co_filename in _HOLDER_FILES:
            return True
        frame = frame.f_back
    return False


_HOLDER_FILES = frozenset(
    os.path.join(os.path.dirname(_section_on_stack.__code__.co_filename), name)
    for name in ("_allocator.py", "_store.py"))


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
    """Times a holder died holding the lock (the next locker repaired)."""
    repairs: int
    """Times a locker found a section left mid-change (a holder died, or an
    exception escaped a locked section) and rebuilt the state."""


class _LockNotTaken(BrokenArenaError):
    """Raised by a lock attempt that did not take the mutex."""


class _Section:
    """``with allocator.locked():``; stateless, so one serves every thread."""

    __slots__ = ("_alloc",)

    def __init__(self, alloc: "FreeListAllocator") -> None:
        self._alloc = alloc

    def __enter__(self) -> "FreeListAllocator":
        self._alloc.lock()
        return self._alloc

    def __exit__(self, exc_type, exc, tb) -> None:
        self._alloc.unlock(consistent=exc_type is None or issubclass(exc_type, CLEAN_EXITS))


class FreeListAllocator:
    """Hand out and take back 64-byte-aligned byte ranges of an Arena.

    Process- and thread-safe.  ``try_allocate`` and ``free`` take the arena
    lock themselves; ``*_locked`` methods, ``blocks`` and ``repair`` expect
    the caller to hold it (``with allocator.locked():``), which lets the
    store do several steps atomically.  Nobody holds the lock across user
    code or a blocking call.  The lock protocol is in the module docstring.
    Does not own *arena*.
    """

    def __init__(self, arena: Arena) -> None:
        self._arena = arena
        self._words = arena.words
        self._words32 = arena.words32
        self._mutex = arena.mutex
        self._section = _Section(self)
        self._repair_hooks: list = []
        #: Native id of the thread holding the lock across a fork (between a
        #: before-fork hook and the parent's after hook), or 0.
        self._fork_holder = 0

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
        """Call *hook()*, with the lock held, after every ``repair()`` that a
        lock operation runs (the allocator's own state is whole by then)."""
        self._repair_hooks.append(hook)

    # -- locking -----------------------------------------------------------

    def _get(self, off: int) -> int:
        return self._words[off >> 3]

    def _set(self, off: int, value: int) -> None:
        # One store: a process killed here leaves the old value or the new.
        self._words[off >> 3] = value

    def _held_here(self) -> bool:
        """Whether the calling thread holds the mutex."""
        owner = self._mutex.owner_tid()
        return bool(owner) and owner == threading.get_native_id()

    def lock(self) -> None:
        """Take the lock, waiting for a live holder; repair first if the
        last section did not end clean.

        Blocks until the lock is free, returning to Python every LOCK_SLICE
        seconds (signal handlers run; a KeyboardInterrupt ends the wait).
        If the calling thread holds the lock already while no section of
        the allocator or the store runs further up its stack, an interrupt
        cut its last section short: the lock is repaired and stays held.

        Raises:
            BrokenArenaError: a live holder kept the lock for LOCK_TIMEOUT
                seconds, or the arena's memory is corrupt.
            ClosedError: the arena is closed in this process.
            RuntimeError: called inside a running section of this thread.
        """
        mutex = self._mutex
        if mutex.closed:
            raise ClosedError("the store's arena is closed in this process")
        owner = self._words32[_W_FUTEX] & FUTEX_TID_MASK
        if owner and owner == threading.get_native_id():
            if owner == self._fork_holder:
                raise RuntimeError(
                    f"this thread (id {owner}) holds the store lock across a fork: "
                    f"the store cannot be used from another fork hook")
            if _section_on_stack(sys._getframe(1)):
                raise RuntimeError(
                    f"this thread (id {owner}) already holds the store lock: lock() "
                    f"inside a locked section (a finalizer must use try_lock())")
            # No section of this thread is running: one was cut by an
            # exception after it took the lock and before it could let go.
            # Its state is dirty: repair, and hold the lock for this caller.
            rc = 0
        else:
            rc = None
        # Every step from here on runs under the except clauses below: an
        # exception that escapes while this thread holds the mutex lets it go.
        try:
            if rc is None:
                rc = mutex.try_acquire()
            words = self._words
            if rc or words[_W_DIRTY]:
                self._enter_slowly(rc, wait=True)
            else:
                words[_W_DIRTY] = _pid
                words[_W_SEQ] += 1      # one store, as every shared word
        except _LockNotTaken:
            raise
        except BaseException:
            self._let_go_surely()
            raise

    def try_lock(self) -> bool:
        """Take the lock if it is free right now; never blocks (it may
        repair).  False also when the calling thread holds it already, as a
        GC finalizer running inside a section does."""
        mutex = self._mutex
        if mutex.closed:
            raise ClosedError("the store's arena is closed in this process")
        owner = self._words32[_W_FUTEX] & FUTEX_TID_MASK
        if owner and owner == threading.get_native_id():
            return False
        try:
            rc = mutex.try_acquire()
            words = self._words
            if not (rc or words[_W_DIRTY]):
                words[_W_DIRTY] = _pid
                words[_W_SEQ] += 1
                return True
            if rc == errno.EBUSY:
                return False
            self._enter_slowly(rc, wait=False)
            return True
        except _LockNotTaken:
            raise
        except BaseException:
            self._let_go_surely()
            raise

    def lock_across_fork(self) -> None:
        """``lock()`` in a before-fork hook: the lock stays held, by this
        thread, until ``unlock_after_fork()`` in the parent's after hook, so
        that nothing changes across the fork.  Until then this thread's
        ``lock()`` raises RuntimeError (another fork hook must not use the
        store) and its ``try_lock()`` returns False.  The child does not own
        the lock: it waits for the parent's release like any process."""
        self.lock()
        self._fork_holder = threading.get_native_id()

    def unlock_after_fork(self, *, consistent: bool = True) -> None:
        """Release the lock ``lock_across_fork()`` took (the parent's after
        hook, or the before hook when it fails); *consistent* as ``unlock``."""
        self._fork_holder = 0
        self.unlock(consistent=consistent)

    def unlock(self, *, consistent: bool = True) -> None:
        """Release the lock.  *consistent*: the section left the shared state
        whole, so the next holder need not repair; False leaves the dirty word
        set.

        Raises:
            RuntimeError: the calling thread does not hold the lock.
        """
        try:
            if consistent:
                self._words[_W_DIRTY] = 0
            rc = self._mutex.release()
        except BaseException:
            self._let_go_surely()
            raise
        if rc:
            raise RuntimeError(
                f"unlock() of the store lock by thread {threading.get_native_id()}, "
                f"which does not hold it ({errno.errorcode.get(rc, rc)})")

    def _enter_slowly(self, rc: int, *, wait: bool) -> None:
        """After ``try_acquire()`` returned *rc*, when it is not the fast
        case: wait for a busy mutex (or refuse, without *wait*), then record
        the hold and repair if the mutex's owner died or the word is dirty."""
        if rc not in _TAKEN:
            rc = self._wait(rc) if wait else self._refuse(rc)
        words = self._words
        if rc or words[_W_DIRTY]:
            self._recover(rc)
        else:
            words[_W_DIRTY] = _pid
            words[_W_SEQ] += 1

    def locked(self) -> _Section:
        """``with allocator.locked():`` runs the body holding the lock; see
        CLEAN_EXITS for which exceptions still end it clean."""
        return self._section

    def _wait(self, rc: int) -> int:
        """Wait until the mutex is taken; return 0 or EOWNERDEAD."""
        mutex = self._mutex
        seen, since = self._get(_H_SEQ), time.monotonic()
        while rc not in _TAKEN:
            if rc not in _BUSY:
                self._refuse(rc)
            seq, now = self._get(_H_SEQ), time.monotonic()
            if seq != seen:
                seen, since = seq, now
            elif now - since >= LOCK_TIMEOUT:
                raise self._stuck_holder(now - since)
            rc = mutex.acquire_for(LOCK_SLICE)
        return rc

    def _recover(self, rc: int) -> None:
        """Just taken, with EOWNERDEAD (*rc*) or the dirty word set: record
        the hold, then repair."""
        if rc:
            self._mutex.make_consistent()
            self._set(_H_TAKEOVERS, self._get(_H_TAKEOVERS) + 1)
        self._set(_H_DIRTY, _pid)
        self._set(_H_SEQ, self._get(_H_SEQ) + 1)
        self._set(_H_REPAIRS, self._get(_H_REPAIRS) + 1)
        self.repair()
        for hook in self._repair_hooks:
            hook()

    def _let_go_surely(self) -> None:
        """``_let_go()``, again if an exception from a signal handler cuts it
        (a few times: an error that recurs is not an interrupt)."""
        for _ in range(_LET_GO_ATTEMPTS):
            try:
                self._let_go()
                return
            except BaseException:
                pass

    def _let_go(self) -> None:
        """An exception is leaving a lock operation: if this thread holds the
        mutex, release it with the dirty word set.  Safe to repeat."""
        if not self._held_here():
            return
        mutex = self._mutex
        mutex.make_consistent()         # EINVAL (ignored) unless just EOWNERDEAD
        try:
            self._set(_H_DIRTY, _pid)
        finally:
            mutex.release()

    def _refuse(self, rc: int):
        """Raise the error for a lock attempt that failed with *rc*."""
        if rc == errno.ENOTRECOVERABLE:
            raise _LockNotTaken(
                "the store lock is unrecoverable: a process that found its holder "
                "dead released it without repairing (recreate the store)")
        if rc == errno.EDEADLK:
            raise _LockNotTaken(
                f"the store lock is held by a thread with this thread's id "
                f"({threading.get_native_id()}) in another PID namespace: processes "
                f"that share a store must share a PID namespace")
        raise _LockNotTaken(
            f"cannot take the store lock: {errno.errorcode.get(rc, rc)} "
            f"({os.strerror(rc)})")

    def _stuck_holder(self, waited: float) -> _LockNotTaken:
        pid, tid = self._get(_H_DIRTY), self._mutex.owner_tid()
        who = f"pid {pid} (thread {tid})" if pid else f"thread {tid}"
        return _LockNotTaken(
            f"the store lock has been held by {who} for {waited:.0f}s with nobody "
            f"else taking it; a lock is held for microseconds, so the holder is "
            f"stopped or stuck: resume it (SIGCONT), or kill it (the next locker "
            f"then repairs the store), or recreate the store")

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
        """A free block of at least *size* bytes, or 0 if there is none."""
        cls = _size_class(size)
        above = self._get(_H_BITMAP) >> (cls + 1)
        if above:               # O(1): every block of a larger class fits
            return self._get(_H_HEADS + 8 * (cls + (above & -above).bit_length()))
        off = self._get(_H_HEADS + 8 * cls)
        while off:              # the whole class: a fitting block is never missed
            if self._get(off) >= size:
                return off
            off = self._get(off + 8)
        return 0

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
        self.lock()
        try:
            offset = self.allocate_locked(nbytes)
        except BaseException:
            self._let_go_surely()
            raise
        # No call between the section and the release (a call is where an
        # exception from a signal handler can fire); see the module docstring.
        self._words[_W_DIRTY] = 0
        self._mutex.release()
        return offset

    def free(self, offset: int) -> None:
        """Give back the payload at *offset* (see ``free_locked``)."""
        self.lock()
        try:
            self.free_locked(offset)
        except CLEAN_EXITS:
            self.unlock()
            raise
        except BaseException:
            self._let_go_surely()
            raise
        self._words[_W_DIRTY] = 0       # no call before the release, as above
        self._mutex.release()

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
            repairs=self._get(_H_REPAIRS),
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
