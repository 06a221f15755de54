"""Sealed objects of raw bytes in the arena: create -> seal | abort, get <-> release.

An object is an allocator block plus a slot in the object table.  A slot
holds the object's generation (unique per object for the life of the
store), its offsets, its state, and who holds it.  An ``ObjectRef`` is
``(store token, slot, generation)``; a ref whose generation no longer
matches its slot is stale, and is refused without reading the object.

Holds.  An object lives while somebody holds it:

- *process holds*: a bit per attached process.  A process sets its bit
  while it has at least one local hold (a view from ``get``, a writable
  view from ``create``, an owning ``ObjectRef`` from ``seal``); the local
  counts live in that process.  When a process dies, whoever notices
  (``reap_dead_processes``) clears its bits: its holds are released.
- *retained counts*: ``retain`` / ``adopt`` / ``release_retained`` count
  messages in flight between processes (taken by the sender, adopted by the
  receiver).
- *dependencies*: an object may hold other objects (a frame whose buffer
  already lived in the store refers to it instead of copying it).

When the last hold goes the block is freed at once, in whichever process
drops it.  Who holds what, and until when, is decided by the "Lifetime
rules" below, kept by the code section of that name.

Views release their hold from a ``weakref.finalize`` on the buffer
*exporter* (a ctypes array), never on a memoryview: numpy and memoryview
re-export from the exporter, so it dies only with the last view.
A finalizer may run inside the garbage collector while this thread already
holds the lock (CPython issue 12352), so it never blocks: it tries the lock
and otherwise leaves the release to a drainer thread (started on the first
such deferral, woken through a pipe) that takes the lock and releases it
moments later.  So a release is never left waiting for a call that may not
come (an idle worker makes none).

Lifetime rules:

1. *Only the creator aborts.*  A created, unsealed object is aborted when
   its creating process drops its last hold on it (or dies, or closes);
   any other holder of it (a fork child) only drops its hold.
2. *Liveness is the kernel's.*  Each attached process has an index in the
   process table and holds an ``fcntl`` open-file-description lock on the
   byte of the arena file at its entry's offset (``_liveness``), through a
   description of its own.  Index *i* is alive while that byte is locked;
   the pid in the entry is only for reports.  A dead index is reaped:
   its holds are released and the objects it was creating are aborted.
   Reaping releases one process's holds, never another's.
3. *Fork leaves no window.*  Before a fork the parent takes the lock and
   keeps it until the fork is done, so no hold is taken or dropped in
   between: it claims an index for the child, sets that index's bit on
   every object it holds, and locks the index's byte through a new
   description, which the child inherits.  After the fork the parent
   releases the lock (the child, which does not own it, waits for that
   like any other process) and closes its copy of the description (a
   failed fork thereby leaves a dead index, reaped like any other); the
   child adopts the index and closes its copy of the parent's description.
   So an inherited view holds its object from the fork on, and a child
   killed at any moment is reaped exactly.
4. *Close keeps what views show.*  ``close()`` releases the holds of owning
   refs at once, but the holds of live views stay, each released with its
   view; the mapping stays until the last one is gone, and then the
   process's index is freed.  A dropped store does the same.  At exit a
   process lets go of everything, views included.
5. *Delete hides, never frees under a referrer.*  ``delete`` makes ``get``
   fail, but an object that depends on the deleted one keeps it, and reads
   it through ``get_dependency``.

Object table (one allocator block; native byte order)::

    +0  magic b"SHMPSTOR"   +8  last generation   +16 free slot head (index+1)
    +24 live objects        +32 fallbacks         +40 max objects
    +64 process table: MAX_PROCESSES x u64 pid (0 = free); the liveness
        byte of index i is the first byte of its entry
    +64 + 8 * MAX_PROCESSES: slots, SLOT_SIZE bytes each:
        +0 generation  +8 block offset (free: next free index+1)  +16 data offset
        +24 nbytes     +32 state u32, retained u32    +40 holders (128-bit mask)
        +56 creator process index u32, dependency count u32

An object's block starts with its dependencies (u64 slot, u64 generation
each), padded to 64 bytes; its data follows.
"""

from __future__ import annotations

import bisect
import os
import threading
from multiprocessing import util
import struct
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _liveness
from ._allocator import CLEAN_EXITS, FreeListAllocator
from ._arena import PAGE_SIZE, Arena, written_pages
from ._errors import (
    ClosedError,
    NotARefError,
    ObjectNotFoundError,
    ObjectStateError,
    StoreFullError,
)

__all__ = ["ObjectRef", "RawStore", "StoreStatistics", "ObjectBuilder"]

MAX_PROCESSES = 128
SLOT_SIZE = 64
#: How long ``create`` waits for another process to free space before it
#: gives up.  Long enough to ride out a consumer that is a little behind,
#: short enough that a store that stays full fails visibly.
DEFAULT_SPACE_TIMEOUT = 2.0

FREE, CREATED, SEALED, DELETED = 0, 1, 2, 3
_VIEW, _REF = 0, 1                       # kinds of local hold
_STATE_NAMES = {FREE: "free", CREATED: "created", SEALED: "sealed", DELETED: "deleted"}

_MAGIC = int.from_bytes(b"SHMPSTOR", "little")
# Native formats on purpose: the standard-size ("<") packers store a u64 one
# byte at a time, so a process SIGKILLed mid-store would leave a torn value;
# native packers copy each field with one store.  The layout is this
# machine's, which is the only machine that maps it.
_TABLE_HEADER = struct.Struct("QQQQQQ")
_U64 = struct.Struct("Q")
_U32 = struct.Struct("I")
_SLOT = struct.Struct("QQQQIIQQII")     # gen, block, data, nbytes, state, retained,
                                         # holders lo, holders hi, creator, ndeps
_DEP = struct.Struct("QQ")
_HOLDERS = struct.Struct("QQ")
_T_GEN, _T_FREE_HEAD, _T_LIVE, _T_FALLBACKS, _T_MAX = 8, 16, 24, 32, 40
_PROC_TABLE = 64
_SLOTS = _PROC_TABLE + 8 * MAX_PROCESSES


def _slot_words(buf, start: int, count: int) -> np.ndarray:
    """The object table's slots as a (count, 8) array of u64 words: a view
    for scanning in bulk (one read per word, like the struct accessors)."""
    return np.ndarray((count, SLOT_SIZE // 8), dtype=np.uint64, buffer=buf, offset=start)


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def object_payload(nbytes: int, ndeps: int = 0) -> int:
    """Bytes of the allocator block payload that holds an object of *nbytes*
    with *ndeps* dependencies.  An object of a page or more owns whole pages
    (copy-on-write rule 1): its data starts on a page, and its extent is
    rounded up to pages; blocks are 64-byte aligned, so up to a page less
    64 bytes may go before it.  That costs at most two pages an object."""
    deps_bytes = _round_up(16 * ndeps, 64)
    if nbytes >= PAGE_SIZE:
        return deps_bytes + PAGE_SIZE - 64 + _round_up(nbytes, PAGE_SIZE)
    return deps_bytes + nbytes


class ObjectRef:
    """The name of one object in one store: a few dozen bytes when pickled.

    A ref returned by ``put``/``seal`` *owns* a hold in the process that made
    it: the object lives at least as long as that ref (or until ``release`` /
    ``delete``).  A ref that arrives pickled is *borrowed*: it names the
    object but keeps nothing alive, so its sender must keep its own ref (or
    a view) until the receiver has called ``get``.
    """

    __slots__ = ("token", "slot", "generation", "_hold", "__weakref__")

    def __init__(self, token: int, slot: int, generation: int) -> None:
        self.token = token
        self.slot = slot
        self.generation = generation
        self._hold = None            # weakref.finalize releasing an owned hold

    @property
    def owned(self) -> bool:
        """True if this ref object keeps its object alive."""
        return self._hold is not None and self._hold.alive

    def __reduce__(self):
        return (ObjectRef, (self.token, self.slot, self.generation))

    def __eq__(self, other):
        if not isinstance(other, ObjectRef):
            return NotImplemented
        return (self.token, self.slot, self.generation) == (
            other.token, other.slot, other.generation)

    def __hash__(self):
        return hash((self.token, self.slot, self.generation))

    def __repr__(self):
        return f"ObjectRef({self.token:#x}, slot={self.slot}, generation={self.generation})"


@dataclass(frozen=True)
class StoreStatistics:
    """A snapshot of one store, the same whichever process asks."""

    capacity: int
    """Bytes available to objects (the arena less its headers)."""
    in_use: int
    """Bytes of allocated blocks, headers and the object table included."""
    peak_in_use: int
    """Largest ``in_use`` since the store was created."""
    live_objects: int
    """Objects created and not yet freed."""
    largest_free_block: int
    """Largest object that fits right now."""
    committed: int
    """Bytes of shared memory reserved so far (the high-water mark)."""
    fallbacks: int
    """Values sent in-band because the store had no room for them."""
    attached_processes: int
    """Processes holding an index in the process table (dead ones until reaped)."""
    lock_takeovers: int
    """Times a holder died holding the lock (the next locker repaired)."""
    repairs: int
    """Times a locker found a section left mid-change (its holder died, or an
    exception escaped it) and rebuilt the state."""
    max_objects: int
    """Size of the object table."""


class ObjectBuilder:
    """A created, unsealed object: ``view`` is writable until ``seal()``.

    Use as a context manager: sealed on normal exit, aborted on error.  If
    the builder and every view of it are dropped unsealed, the object is
    aborted.  Not thread-safe; owned by the creating process.
    """

    def __init__(self, store: "RawStore", ref: ObjectRef, view: memoryview) -> None:
        self._store = store
        self.ref = ref
        self.view = view

    def seal(self) -> ObjectRef:
        """Freeze the object and return an owning ref to it."""
        return self._store.seal(self.ref)

    def abort(self) -> None:
        self._store.abort(self.ref)

    def __enter__(self) -> "ObjectBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.ref = self.seal()
        else:
            self.abort()


_open_stores: "weakref.WeakSet[RawStore]" = weakref.WeakSet()


class RawStore:
    """Objects of bytes in a shared arena, usable from every attached process.

    The process that constructs a RawStore owns its arena; pickling the
    store (as a ``Process`` argument or a Pool initializer argument) attaches
    the receiving process, and fork children are attached automatically.

    Thread- and process-safe.  Every method that touches shared state takes
    the arena lock for microseconds and never runs user code under it.
    ``create`` may wait up to *space_timeout* seconds for space.

    ``get`` hands out copy-on-write views, or read-only ones if the store
    was made with ``readonly=True`` (recorded in the arena's header, so
    every attached process agrees).
    """

    def __init__(self, capacity: int | None = None, *, max_objects: int | None = None,
                 space_timeout: float = DEFAULT_SPACE_TIMEOUT, readonly: bool = False) -> None:
        arena = Arena.create(capacity, readonly=readonly)
        try:
            alloc = FreeListAllocator.format(arena)
            if max_objects is None:
                max_objects = max(64, min(65536, arena.capacity // 16384))
            table_bytes = _SLOTS + SLOT_SIZE * max_objects
            table = alloc.try_allocate(table_bytes)
            if table is None:
                raise StoreFullError(
                    f"a table of {max_objects} objects ({table_bytes} bytes) does "
                    f"not fit in a store of {arena.capacity} bytes "
                    f"(pass a smaller max_objects= or a larger capacity=)")
            buf = arena.buf                  # a new arena reads as zeros
            _TABLE_HEADER.pack_into(buf, table, _MAGIC, 0, 1 if max_objects else 0,
                                    0, 0, max_objects)
            # Chain every slot into the free list: slot i's "next" is i + 2
            # (index + 1 of the following slot), the last one's is 0.
            words = _slot_words(buf, table + _SLOTS, max_objects)
            words[:, 1] = np.arange(2, max_objects + 2, dtype=np.uint64)
            words[-1:, 1] = 0
            del words
        except BaseException:
            arena.close()
            raise
        self._setup(arena, alloc, table, space_timeout)

    @classmethod
    def _attach(cls, arena: Arena, table: int, space_timeout: float) -> "RawStore":
        store = cls.__new__(cls)
        store._setup(arena, FreeListAllocator(arena), table, space_timeout)
        return store

    def _setup(self, arena: Arena, alloc: FreeListAllocator, table: int,
               space_timeout: float) -> None:
        self._arena = arena
        self._alloc = alloc
        self._buf = arena.buf
        self._words = arena.words
        self._words32 = arena.words32
        self._table = table
        self._slots = table + _SLOTS
        self._max_objects = _U64.unpack_from(self._buf, table + _T_MAX)[0]
        self.token = arena.token
        self.space_timeout = space_timeout
        self._closed = False          # close() was called: the API refuses
        self._closed_why = "this store is closed (create a new one)"
        self._detached = False        # and the last view is gone: nothing held here
        self._local: dict[tuple[int, int], int] = {}       # (slot, gen) -> holds here
        self._nviews = 0                                   # live exporters (views)
        self._nrefs: dict[tuple[int, int], int] = {}       # (slot, gen) -> owning refs
        # A hold's finalizer carries the epoch it was taken in; close() ends
        # the refs' epoch, forget_inherited_holds() both.
        self._view_epoch = 0
        self._ref_epoch = 0
        self._deferred: list[tuple[Any, ...]] = []   # (key, kind, epoch) dropped by the GC
        self._forks: dict[int, tuple[int, int]] = {}       # thread -> (index, fd) for a child
        # addr -> end, slot, gen, data, copy-on-write?
        self._exports: dict[int, tuple[int, int, int, int, bool]] = {}
        # (slot, gen) -> address of the view that has the object's range of
        # the private mapping (see "Copy-on-write views")
        self._cow_ranges: dict[tuple[int, int], int] = {}
        self.readonly = arena.readonly
        self._export_starts: list[int] | None = None
        self._drainer: tuple[threading.Thread, int] | None = None  # thread, pipe write end
        self._drainer_lock = threading.Lock()
        self._pid = os.getpid()
        alloc.add_repair_hook(self._repair_locked)
        with _fd_guard:
            self._live_fd = _liveness.open_private(arena.fileno())
            try:
                with alloc.locked():
                    self._index = self._claim_process_index_locked(self._live_fd)
            except BaseException:
                os.close(self._live_fd)
                raise
            _open_stores.add(self)
        self._close_at_exit()

    def _close_at_exit(self) -> None:
        # multiprocessing runs these finalizers when a worker process ends
        # (it leaves by os._exit, which skips atexit) and at interpreter
        # exit; the lowest priority runs them after pools have stopped.
        util.Finalize(self, RawStore._exit, args=(self,), exitpriority=-10)
        util.register_after_fork(self, RawStore._close_at_exit)

    def _exit(self) -> None:
        """The process is ending: close, and let go of what its views still
        hold too, so that others need not wait for a reap to get it back."""
        self.close()
        if not self._detached and self._pid == os.getpid():
            self._nviews = 0
            self._finish_close(blocking=True)

    def __reduce__(self):
        self._check_open()
        return (RawStore._attach, (self._arena, self._table, self.space_timeout))

    # -- Lifetime rules (see the module docstring) -------------------------

    def _proc_at(self, index: int) -> int:
        """Arena offset of process *index*'s entry; also its liveness byte."""
        return self._table + _PROC_TABLE + 8 * index

    def _alive(self, index: int) -> bool:
        """Rule 2: index *index* (not this store's own) is alive while a
        description other than ours locks its byte."""
        return _liveness.is_held(self._live_fd, self._proc_at(index))

    def _claim_process_index_locked(self, fd: int) -> int:
        """Rule 2: reap every dead index, then take the first free one for
        the process whose liveness description is *fd*, locking its byte
        through *fd*.  The entry gets this process's pid.

        Raises:
            StoreFullError: MAX_PROCESSES indexes are alive.
        """
        claimed = None
        for index in range(MAX_PROCESSES):
            at = self._proc_at(index)
            attached = self._words[at >> 3]
            if not attached and claimed is not None:
                continue
            if _liveness.is_held(fd, at):
                continue          # alive, or leaving (entry cleared, fd not yet closed)
            if attached:
                self._release_process_locked(index)      # it died
            if claimed is None and _liveness.try_hold(fd, at):
                claimed = index
        if claimed is None:
            raise StoreFullError(
                f"{MAX_PROCESSES} live processes are attached to this store; "
                f"no more can attach (use fewer worker processes)")
        self._put64(self._proc_at(claimed), os.getpid())
        return claimed

    def _release_process_locked(self, index: int) -> None:
        """Release every hold process *index* has, abort the objects it was
        creating (rule 1), and free its entry.  Touches no other index's
        bits (rule 2)."""
        word, bit = (5, 1 << index) if index < 64 else (6, 1 << (index - 64))
        words = _slot_words(self._buf, self._slots, self._max_objects)
        held = np.flatnonzero(words[:, word] & np.uint64(bit)).tolist()
        del words
        for slot in held:
            at = self._slot_at(slot)
            self._put64(at + 40 + 8 * (word - 5),
                        _U64.unpack_from(self._buf, at + 40 + 8 * (word - 5))[0] & ~bit)
            self._abort_if_creator_locked(slot, index)
        for slot in held:
            self._maybe_free_locked(slot)
        self._put64(self._proc_at(index), 0)

    def _abort_if_creator_locked(self, slot: int, index: int) -> None:
        """Rule 1: process *index* let go of *slot*; if it is the creator of
        an unsealed object there, that object is aborted."""
        at = self._slot_at(slot)
        if (_U32.unpack_from(self._buf, at + 32)[0] == CREATED
                and _U32.unpack_from(self._buf, at + 56)[0] == index):
            self._put32(at + 32, DELETED)

    def reap_dead_processes(self) -> int:
        """Release every hold of every attached process that has died, and
        abort the objects they were still creating.  Returns how many were
        reaped.  Call it when a worker is known to have died."""
        reaped = 0
        with self._locked():
            for index in range(MAX_PROCESSES):
                if (index != self._index and self._words[self._proc_at(index) >> 3]
                        and not self._alive(index)):
                    self._release_process_locked(index)
                    reaped += 1
        return reaped

    def _before_fork(self) -> None:
        """Rule 3, in the forking thread before the fork: claim the child's
        index, hold everything this process holds under it too, and lock
        its byte through a description the child will inherit."""
        if self._detached or self._pid != os.getpid():
            return
        fd = _liveness.open_private(self._arena.fileno())
        try:
            self._alloc.lock_across_fork()
        except BaseException:
            os.close(fd)
            raise
        try:
            self._drain_deferred_locked()
            index = self._claim_process_index_locked(fd)
            bit = 1 << index
            for slot, gen in self._local:
                if _U64.unpack_from(self._buf, self._slot_at(slot))[0] == gen:
                    self._set_holders(slot, self._holders(slot) | bit)
        except BaseException as exc:
            self._alloc.unlock_after_fork(consistent=isinstance(exc, CLEAN_EXITS))
            os.close(fd)
            raise
        # The lock stays held until _after_fork_in_parent: a hold taken or
        # dropped between here and the fork would not be the child's too.
        self._forks[threading.get_ident()] = (index, fd)

    def _after_fork_in_parent(self) -> None:
        claimed = self._forks.pop(threading.get_ident(), None)
        if claimed is not None:
            self._alloc.unlock_after_fork()
            os.close(claimed[1])      # the child's copy keeps the index alive

    def _after_fork_in_child(self) -> None:
        claimed = self._forks.pop(threading.get_ident(), None)
        for _, fd in self._forks.values():          # other threads' children's
            os.close(fd)
        self._forks = {}
        self._pid = os.getpid()
        self._drainer_lock = threading.Lock()     # maybe held by a thread gone now
        self._close_drainer()                 # the thread did not survive fork
        if self._live_fd is not None:
            os.close(self._live_fd)           # the parent's: it must not look alive
            self._live_fd = None
        if claimed is None:
            # The parent could not claim an index for this process (all
            # taken, or the store broke): nothing here is held, so the store
            # is unusable in this process.
            self._closed = self._detached = True
            self._closed_why = (
                f"this process was forked while no index of the store's process "
                f"table could be claimed for it ({MAX_PROCESSES} processes attached, "
                f"or the store broken), so it holds nothing here (attach fewer "
                f"processes at once)")
            self._local.clear()
            _open_stores.discard(self)
            return
        self._index, self._live_fd = claimed
        self._put64(self._proc_at(self._index), self._pid)   # only ours writes it
        if self._deferred:
            self._wake_drainer()

    def forget_inherited_holds(self) -> None:
        """Give up every hold this process has, inherited through fork
        included, as one call made first thing in a new process.

        For a fork child that gets its store data as arguments and uses
        nothing it inherited: the parent's objects are then freed when the
        parent drops them, instead of living as long as the child.  Views the
        child inherited must not be used afterwards (they may show another
        object's bytes); nor can they be put again without a copy.  shmpool's
        own workers do not call it: a task may read a global view.
        """
        with self._locked():
            self._release_process_locked(self._index)
            self._put64(self._proc_at(self._index), os.getpid())
            self._forget_local_holds()
            self._arena.drop_all_private()     # inherited written pages: stale soon

    def _forget_local_holds(self) -> None:
        """Forget this process's local counts; finalizers of the holds they
        counted find their epoch ended and do nothing."""
        self._local.clear()
        self._nrefs.clear()
        self._nviews = 0
        self._view_epoch += 1
        self._ref_epoch += 1
        self._deferred.clear()
        self._exports.clear()
        self._cow_ranges.clear()
        self._export_starts = None

    def close(self) -> None:
        """Detach this process from the store.  Idempotent; never blocks
        for longer than the lock takes.

        Owning refs made here stop holding their objects now (rule 4), and
        every method but this one raises ClosedError from now on.  Views
        already handed out stay valid: each keeps its object until it is
        dropped, and the mapping and this process's index stay until the
        last one is.  In the owner, the store's memory goes once every
        process has let go.
        """
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid or self._arena.closed:
            self._detach()
            return
        try:
            with _DrainingLock(self):
                for key, n in list(self._nrefs.items()):
                    for _ in range(n):
                        self._unhold_locked(key)
                self._nrefs.clear()
                self._ref_epoch += 1
        except Exception:
            pass       # a broken arena must not stop the close
        self._finish_close(blocking=True)

    def _finish_close(self, *, blocking: bool) -> bool:
        """Rule 4: once closed and without views, free this process's index
        and drop the mapping.  With *blocking* False (a finalizer), never
        waits: returns False if the drainer thread must do it instead."""
        if not self._closed or self._detached or self._nviews:
            return True
        drainer = self._drainer
        if drainer is not None and drainer[0] is not threading.current_thread():
            if not blocking:
                return False                 # only a join makes the lock safe to drop
            self._stop_drainer()             # before the guard: it may want the guard
        if not _fd_guard.acquire(blocking):
            return False
        try:
            if self._detached or self._nviews:
                return True
            try:
                if blocking:
                    self._alloc.lock()
                elif not self._alloc.try_lock():
                    return False
                with _HeldLock(self._alloc):
                    self._drain_deferred_locked()
                    if self._nviews:
                        return True
                    self._release_process_locked(self._index)
            except Exception:
                pass       # a broken arena must not stop the close
            self._detach()
        finally:
            _fd_guard.release()
        return True

    def _detach(self) -> None:
        """Drop this process's liveness description and mapping."""
        self._detached = True
        _open_stores.discard(self)
        self._close_drainer()
        if self._live_fd is not None:
            os.close(self._live_fd)
            self._live_fd = None
        self._local.clear()
        self._nrefs.clear()
        self._deferred.clear()
        self._exports.clear()
        self._cow_ranges.clear()
        self._export_starts = None
        self._arena.close()

    # -- slots -------------------------------------------------------------

    def _slot_at(self, slot: int) -> int:
        return self._slots + SLOT_SIZE * slot

    def _read_slot(self, slot: int):
        return _SLOT.unpack_from(self._buf, self._slot_at(slot))

    # Shared words are stored whole: ``struct.pack_into`` zeroes its target
    # before it writes, so a process killed inside it would leave a 0 (no
    # holders, no count) for the next lock holder to act on.  Item
    # assignment on a memoryview converts the value first, then stores it.

    def _put64(self, offset: int, value: int) -> None:
        self._words[offset >> 3] = value

    def _put32(self, offset: int, value: int) -> None:
        self._words32[offset >> 2] = value

    def _validate_locked(self, ref: ObjectRef, *states: int):
        """Return the slot fields of *ref*, or raise if the ref is stale,
        forged, from another store, or the object is in the wrong state."""
        if not isinstance(ref, ObjectRef):
            raise NotARefError(f"expected an ObjectRef, got {type(ref).__name__}")
        if ref.token != self.token:
            raise ObjectNotFoundError(f"{ref!r} belongs to another store")
        if not 0 <= ref.slot < self._max_objects:
            raise ObjectNotFoundError(
                f"{ref!r} names slot {ref.slot}, outside this store's "
                f"{self._max_objects} slots (forged or corrupted ref)")
        fields = self._read_slot(ref.slot)
        if fields[0] != ref.generation or fields[4] == FREE:
            raise ObjectNotFoundError(
                f"{ref!r} names no live object: it was freed, or never existed "
                f"(keep the ref returned by put() alive while others read it)")
        if fields[4] == DELETED and DELETED not in states:
            raise ObjectNotFoundError(
                f"{ref!r} was deleted (or aborted): its remaining views stay "
                f"valid, but it cannot be read again")
        if fields[4] not in states:
            raise ObjectStateError(
                f"{ref!r} is {_STATE_NAMES[fields[4]]}, expected "
                f"{' or '.join(_STATE_NAMES[s] for s in states)}")
        return fields

    def _holders(self, slot: int) -> int:
        lo, hi = _HOLDERS.unpack_from(self._buf, self._slot_at(slot) + 40)
        return lo | hi << 64

    def _set_holders(self, slot: int, mask: int) -> None:
        at = self._slot_at(slot)
        self._put64(at + 40, mask & (2**64 - 1))
        self._put64(at + 48, mask >> 64)

    def _maybe_free_locked(self, slot: int) -> None:
        """Free *slot*'s object if nothing holds it any more, then drop the
        counts it held on its dependencies (which may free them in turn).

        Order matters if this process dies midway: the slot is marked free
        first (a repair then frees the orphaned block), and dependencies are
        released last, so a crash can leak a dependency but never release
        one twice.
        """
        pending = [slot]
        while pending:
            slot = pending.pop()
            gen, block, _, _, state, retained, lo, hi, _, ndeps = self._read_slot(slot)
            if state == FREE or retained or lo or hi:
                continue
            deps = [_DEP.unpack_from(self._buf, block + 16 * i) for i in range(ndeps)]
            at = self._slot_at(slot)
            self._put32(at + 32, FREE)        # stale refs now fail
            self._put64(at + 8, _U64.unpack_from(
                self._buf, self._table + _T_FREE_HEAD)[0])
            self._put64(self._table + _T_FREE_HEAD, slot + 1)
            self._add_live(-1)
            self._alloc.free_locked(block)
            for dslot, dgen in deps:
                dat = self._slot_at(dslot)
                if _U64.unpack_from(self._buf, dat)[0] == dgen:
                    r = _U32.unpack_from(self._buf, dat + 36)[0]
                    self._put32(dat + 36, max(r - 1, 0))
                    pending.append(dslot)

    def _add_live(self, delta: int) -> None:
        at = self._table + _T_LIVE
        self._put64(at, _U64.unpack_from(self._buf, at)[0] + delta)

    # -- local holds -------------------------------------------------------
    #
    # A process's holds are counted here, per object: each live view (an
    # exporter) and each owning ref counts one; the process's bit in the
    # slot is set while the count is above 0.  Views and refs are also
    # counted apart, so that close() can drop the refs' holds and keep the
    # views' (rule 4).

    def _hold_locked(self, slot: int, gen: int) -> None:
        key = (slot, gen)
        count = self._local.get(key, 0)
        if count == 0:
            self._set_holders(slot, self._holders(slot) | 1 << self._index)
        self._local[key] = count + 1

    def _unhold_locked(self, key: tuple[int, int]) -> None:
        count = self._local.get(key, 0)
        if count > 1:
            self._local[key] = count - 1
            return
        self._local.pop(key, None)
        if count == 1:
            slot, gen = key
            if _U64.unpack_from(self._buf, self._slot_at(slot))[0] == gen:
                self._set_holders(slot, self._holders(slot) & ~(1 << self._index))
                self._abort_if_creator_locked(slot, self._index)
                self._maybe_free_locked(slot)

    def _drop_hold_locked(self, key: tuple[int, int], kind: int, epoch: int) -> None:
        """A view (kind _VIEW) or an owning ref (_REF) of *key* is gone;
        a hold of an ended epoch was already let go."""
        if kind == _VIEW:
            if epoch != self._view_epoch:
                return
            self._nviews -= 1
        else:
            if epoch != self._ref_epoch:
                return
            left = self._nrefs.get(key, 0) - 1
            if left > 0:
                self._nrefs[key] = left
            else:
                self._nrefs.pop(key, None)
        self._unhold_locked(key)

    def _drain_deferred_locked(self) -> None:
        while self._deferred:
            self._drop_hold_locked(*self._deferred.pop())

    def _release_from_gc(self, key: tuple[int, int], kind: int, epoch: int) -> None:
        # Runs from weakref.finalize: maybe inside the GC, maybe in a thread
        # that already holds the lock.  Never block here.
        if self._detached or os.getpid() != self._pid:
            return
        if self._alloc.try_lock():
            with _HeldLock(self._alloc):
                self._drain_deferred_locked()
                self._drop_hold_locked(key, kind, epoch)
            if not self._finish_close(blocking=False):
                self._wake_drainer()
        else:
            self._deferred.append((key, kind, epoch))
            self._wake_drainer()

    def _wake_drainer(self) -> None:
        # Called from finalizers: only non-blocking steps (os.write to a
        # non-blocking pipe), and _drainer_lock only tried, never waited for.
        # The write end is used and closed under that lock only, so a wake-up
        # never goes into a descriptor number reused since.
        if not self._drainer_lock.acquire(blocking=False):
            return              # being started (it drains at start) or stopped
        try:
            if self._drainer is None:
                read_end, write_end = os.pipe()
                os.set_blocking(write_end, False)
                thread = threading.Thread(target=self._drain_forever, args=(read_end,),
                                          name="shmpool-release", daemon=True)
                thread.start()
                self._drainer = (thread, write_end)
            os.write(self._drainer[1], b"x")
        except RuntimeError:                  # interpreter shutting down
            pass
        except OSError:
            pass                              # already woken (pipe full)
        finally:
            self._drainer_lock.release()

    def _close_drainer(self) -> "threading.Thread | None":
        """Close the drainer's write end (it then reads EOF and exits), once,
        whichever thread asks first; return its thread, or None."""
        with self._drainer_lock:
            drainer, self._drainer = self._drainer, None
            if drainer is None:
                return None
            os.close(drainer[1])
        return drainer[0]

    def _drain_forever(self, read_end: int) -> None:
        try:
            while not self._detached:
                if self._deferred:
                    try:
                        with _DrainingLock(self):
                            pass              # entering drains the deferred releases
                    except Exception:         # broken meanwhile: close() reports it
                        pass
                self._finish_close(blocking=True)
                if self._detached or not os.read(read_end, 4096):
                    return                    # close() closed the write end
        finally:
            os.close(read_end)

    def _stop_drainer(self) -> None:
        """End the drainer thread and wait for it: after this, no thread of
        this store touches the lock but the caller's."""
        thread = self._close_drainer()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _locked(self):
        self._check_open()
        return _DrainingLock(self)

    def _own_locked(self, slot: int, gen: int) -> ObjectRef:
        """A fresh owning ref whose life is one hold of this process."""
        key = (slot, gen)
        self._hold_locked(slot, gen)
        self._nrefs[key] = self._nrefs.get(key, 0) + 1
        owned = ObjectRef(self.token, slot, gen)
        owned._hold = weakref.finalize(owned, self._release_from_gc, key, _REF, self._ref_epoch)
        owned._hold.atexit = False
        return owned

    # -- Copy-on-write views ----------------------------------------------
    #
    # Unless the store is read-only, ``get`` exports a sealed object from
    # the arena's private mapping (``Arena.export_private``): reads share
    # the store's pages, and a write copies the written page into this
    # process alone.  The rules that keep that correct:
    #
    # 1. An object of PAGE_SIZE bytes or more owns whole pages (``create``
    #    aligns its data to a page and rounds its extent up to pages), so a
    #    written page never holds another object's bytes.  A smaller object
    #    is handed out as a private copy instead (at most a page: cheap).
    # 2. One view at a time has an object's range of the private mapping
    #    (``_cow_ranges``); a second concurrent ``get`` of the same object
    #    gets a private mapping of its own, so it never sees the first
    #    view's writes.
    # 3. Before the hold of the view that has the range is released, its
    #    finalizer drops the range's private pages (``drop_private``) if
    #    it has any, so a block freed and reused never shows stale private
    #    pages here.  (Pages only read map the shared page itself: they
    #    stay, so the next view of the block does not fault them in again.)  A
    #    fork child inherits the range with the view and drops it likewise;
    #    ``forget_inherited_holds`` drops every private page at once.
    # 4. ``locate`` does not find a range with written pages: ``put`` of a
    #    written view copies its bytes instead of referring to the object.

    def _export_locked(self, slot: int, gen: int, data: int, nbytes: int, *,
                       writable: bool, held: bool = False, cow: bool = False,
                       copy_small: bool = True):
        """A view of the object's data whose life is one hold of this
        process (taken here, unless *held* says the caller took it).
        With *cow*, a writable copy-on-write view (rules above); a
        *cow* view of an object smaller than a page is a private copy that
        holds nothing, or with *copy_small* False a read-only view."""
        key = (slot, gen)
        if cow and (nbytes < PAGE_SIZE or data % PAGE_SIZE):
            if copy_small:
                return memoryview(bytearray(self._buf[data:data + nbytes]))
            cow = False
        if not held:
            self._hold_locked(slot, gen)
        private_range = None
        if cow:
            fresh = key in self._cow_ranges
            exporter, start = self._arena.export_private(data, nbytes, fresh=fresh)
            if not fresh:
                self._cow_ranges[key] = start
                private_range = (data, nbytes)
        else:
            exporter = self._arena.export(data, nbytes)
            start = self._arena.address + data
        self._exports[start] = (start + nbytes, slot, gen, data, cow)
        self._export_starts = None
        self._nviews += 1
        fin = weakref.finalize(exporter, self._drop_export, start, key, self._view_epoch,
                               private_range)
        fin.atexit = False
        view = memoryview(exporter).cast("B")
        return view if writable or cow else view.toreadonly()

    def _drop_export(self, start: int, key: tuple[int, int], epoch: int,
                     private_range: tuple[int, int] | None) -> None:
        entry = self._exports.get(start)
        if entry is not None and (entry[1], entry[2]) == key:
            del self._exports[start]
            self._export_starts = None
        if (private_range is not None and epoch == self._view_epoch
                and not self._detached and self._cow_ranges.get(key) == start):
            try:
                # Rule 3.  Only if a page was written: dropping clean pages
                # too would make the next view of this block fault them in
                # again (a fault per 64 KiB read), for nothing.
                if written_pages(start, private_range[1]):
                    self._arena.drop_private(*private_range)
            except (OSError, ValueError):
                pass          # the mapping is gone: nothing private is left
            # Only now: until here a get in another thread takes a mapping of
            # its own (rule 2) rather than the range being dropped.
            del self._cow_ranges[key]
        self._release_from_gc(key, _VIEW, epoch)

    # -- objects -----------------------------------------------------------

    def create(self, nbytes: int, *, depends_on: tuple[ObjectRef, ...] = (),
               timeout: float | None = None) -> ObjectBuilder:
        """Create an object of *nbytes*; write it through ``builder.view``,
        then ``seal()`` or ``abort()`` it.

        Each ref in *depends_on* is held by the new object until it is freed.
        Waits up to *timeout* seconds (default: the store's space_timeout)
        for space that other holders free.

        Raises:
            StoreFullError: the object can never fit, or no space came in time.
            ValueError: *nbytes* is negative.
        """
        if not isinstance(nbytes, int) or isinstance(nbytes, bool):
            raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self._check_open()
        deps_bytes = _round_up(16 * len(depends_on), 64)
        total = object_payload(nbytes, len(depends_on))
        self._alloc.check_size(total)
        timeout = self.space_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            with self._locked():
                made = self._create_locked(total, deps_bytes, nbytes, depends_on)
            if made is not None:
                break
            if time.monotonic() >= deadline:
                self.reap_dead_processes()
                with self._locked():
                    made = self._create_locked(total, deps_bytes, nbytes, depends_on)
                if made is not None:
                    break
                stats = self.statistics()
                raise StoreFullError(
                    f"no room for an object of {nbytes} bytes within {timeout}s: "
                    f"{stats.in_use} of {stats.capacity} bytes in use by "
                    f"{stats.live_objects} objects, largest free block "
                    f"{stats.largest_free_block} bytes (release objects, or pass "
                    f"a larger capacity=)")
            time.sleep(delay)        # waiting for another process to free space
            delay = min(delay * 2, 0.05)
        ref, view = made
        return ObjectBuilder(self, ref, view)

    def _create_locked(self, total, deps_bytes, nbytes, depends_on):
        dep_fields = [self._validate_locked(d, SEALED, DELETED, CREATED) for d in depends_on]
        free_head = _U64.unpack_from(self._buf, self._table + _T_FREE_HEAD)[0]
        if not free_head:
            return None
        block = self._alloc.allocate_locked(total)
        if block is None:
            return None
        slot = free_head - 1
        at = self._slot_at(slot)
        next_free = _U64.unpack_from(self._buf, at + 8)[0]
        gen = _U64.unpack_from(self._buf, self._table + _T_GEN)[0] + 1
        self._put64(self._table + _T_GEN, gen)
        self._put64(self._table + _T_FREE_HEAD, next_free)
        for i, (d, fields) in enumerate(zip(depends_on, dep_fields)):
            self._put64(block + 16 * i, d.slot)
            self._put64(block + 16 * i + 8, d.generation)
            self._put32(self._slot_at(d.slot) + 36, fields[5] + 1)
        # Every field first, the state last: until it says CREATED the slot
        # is free to everyone (a repair puts it back on the free list), and
        # from then on it has the creator's hold, so that a creator killed
        # right after still has its hold found and released.
        self._put64(at, gen)
        self._put64(at + 8, block)
        data = block + deps_bytes
        if nbytes >= PAGE_SIZE:
            data = _round_up(data, PAGE_SIZE)
        self._put64(at + 16, data)
        self._put64(at + 24, nbytes)
        self._put32(at + 36, 0)
        self._set_holders(slot, 1 << self._index)
        self._put32(at + 56, self._index)
        self._put32(at + 60, len(depends_on))
        self._put32(at + 32, CREATED)
        self._add_live(1)
        self._local[(slot, gen)] = 1      # the writable view's hold (bit set above)
        view = self._export_locked(slot, gen, data, nbytes,
                                   writable=True, held=True)
        return ObjectRef(self.token, slot, gen), view

    def seal(self, ref: ObjectRef) -> ObjectRef:
        """Make a created object immutable and visible to ``get``; return an
        owning ref.  Raises ObjectStateError if it is not in created state."""
        with self._locked():
            self._validate_creator_locked(ref)
            self._put32(self._slot_at(ref.slot) + 32, SEALED)
            return self._own_locked(ref.slot, ref.generation)

    def abort(self, ref: ObjectRef) -> None:
        """Discard a created object: as if it had never been created.  Its
        memory returns once its writable views are gone.  Only the creating
        process may abort (or seal) an object (rule 1)."""
        with self._locked():
            self._validate_creator_locked(ref)
            self._put32(self._slot_at(ref.slot) + 32, DELETED)
            self._maybe_free_locked(ref.slot)

    def _validate_creator_locked(self, ref: ObjectRef):
        fields = self._validate_locked(ref, CREATED)
        if fields[8] != self._index:
            raise ObjectStateError(
                f"{ref!r} is being created by another process: only its creator "
                f"seals or aborts it (a fork child inherits the view, not the object)")
        return fields

    def get(self, ref: ObjectRef, *, copy_small: bool = True) -> memoryview:
        """Return a view of a sealed object's bytes, zero-copy.

        The view is writable, copy-on-write (see "Copy-on-write views"):
        reading copies nothing, and a write copies the written pages into
        this process only; the object itself never changes.  An object
        smaller than a page comes as a private copy that holds nothing (with
        *copy_small* False: as a read-only view that holds it).  In a
        read-only store the view is read-only instead.

        The object stays (not freed, memory not reused) until this view and
        every view derived from it (slices, numpy arrays, casts) are gone.

        Raises:
            ObjectNotFoundError: stale, forged, foreign or deleted ref.
            ObjectStateError: the object is not sealed yet.
        """
        with self._locked():
            fields = self._validate_locked(ref, SEALED)
            return self._export_locked(ref.slot, ref.generation, fields[2], fields[3],
                                       writable=False, cow=not self.readonly,
                                       copy_small=copy_small)

    def get_dependency(self, holder: ObjectRef, ref: ObjectRef) -> memoryview:
        """Like ``get``, for *ref* read as part of *holder*, an object created
        with *ref* in its ``depends_on`` that this process holds (a view or
        an owning ref): works after ``delete(ref)`` too, since *holder*
        keeps *ref*'s object (rule 5).

        Raises:
            ObjectNotFoundError: *holder* is not held here, or does not
                depend on *ref*.
        """
        with self._locked():
            hfields = self._validate_locked(holder, SEALED, DELETED)
            if (holder.slot, holder.generation) not in self._local:
                raise ObjectNotFoundError(
                    f"{holder!r} is not held by this process (get() it first, "
                    f"then read its dependencies)")
            if ref.token != self.token or (ref.slot, ref.generation) not in [
                    _DEP.unpack_from(self._buf, hfields[1] + 16 * i)
                    for i in range(hfields[9])]:
                raise ObjectNotFoundError(f"{holder!r} does not depend on {ref!r}")
            fields = self._validate_locked(ref, SEALED, DELETED)
            return self._export_locked(ref.slot, ref.generation, fields[2], fields[3],
                                       writable=False, cow=not self.readonly)

    def contains(self, ref: ObjectRef) -> bool:
        """True if *ref* names a sealed, undeleted object of this store."""
        with self._locked():
            try:
                self._validate_locked(ref, SEALED)
            except (ObjectNotFoundError, ObjectStateError):
                return False
        return True

    def release(self, ref: ObjectRef) -> None:
        """Give up the hold an owning ref keeps (as if it were garbage
        collected, but now).  Views of the object stay valid.

        Raises:
            ObjectStateError: *ref* owns no hold (borrowed, or released).
        """
        self._check_open()
        if not ref.owned:
            raise ObjectStateError(
                f"{ref!r} holds nothing in this process (it was released, or it "
                f"arrived pickled: only the ref returned by put() or seal() owns)")
        ref._hold()

    def delete(self, ref: ObjectRef) -> None:
        """Make *ref*'s object unreachable by ``get`` and drop the hold *ref*
        owns, if any.  Views already handed out stay valid until dropped."""
        with self._locked():
            self._validate_locked(ref, SEALED, DELETED)
            self._put32(self._slot_at(ref.slot) + 32, DELETED)
        if ref.owned:
            ref._hold()

    # -- counts for messages in flight -------------------------------------

    def retain(self, ref: ObjectRef) -> None:
        """Add a count that keeps the object alive until ``adopt`` or
        ``release_retained`` takes it back (a message in flight)."""
        with self._locked():
            fields = self._validate_locked(ref, SEALED, DELETED)
            self._put32(self._slot_at(ref.slot) + 36, fields[5] + 1)

    def release_retained(self, ref: ObjectRef) -> None:
        """Take back a count added by ``retain``."""
        with self._locked():
            fields = self._validate_locked(ref, SEALED, DELETED)
            if not fields[5]:
                raise ObjectStateError(f"{ref!r} has no retained count to release")
            self._put32(self._slot_at(ref.slot) + 36, fields[5] - 1)
            self._maybe_free_locked(ref.slot)

    def adopt(self, ref: ObjectRef) -> ObjectRef:
        """Turn a count added by ``retain`` (maybe in another process) into
        an owning ref in this process."""
        with self._locked():
            fields = self._validate_locked(ref, SEALED, DELETED)
            if not fields[5]:
                raise ObjectStateError(f"{ref!r} has no retained count to adopt")
            owned = self._own_locked(ref.slot, ref.generation)
            self._put32(self._slot_at(ref.slot) + 36, fields[5] - 1)
        return owned

    # -- lookups -----------------------------------------------------------

    @property
    def has_views(self) -> bool:
        """True if this process holds any view of this store (``locate`` can
        only find buffers in those)."""
        return bool(self._exports)

    def locate(self, address: int, nbytes: int) -> tuple[ObjectRef, int] | None:
        """If ``[address, address + nbytes)`` lies in an object this process
        holds a view of, return ``(borrowed ref, offset in the object)``.
        A range of a copy-on-write view with a page written in this
        process is not found: its bytes are no longer the object's."""
        starts = self._export_starts
        if starts is None:
            starts = self._export_starts = sorted(self._exports)
        i = bisect.bisect_right(starts, address) - 1
        if i < 0:
            return None
        entry = self._exports.get(starts[i])
        if entry is None or address + nbytes > entry[0]:
            return None
        _, slot, gen, _, cow = entry
        if cow and written_pages(address, nbytes):
            return None
        return ObjectRef(self.token, slot, gen), address - starts[i]

    def state_of(self, ref: ObjectRef) -> str:
        """'created', 'sealed', 'deleted' or 'free' (stale)."""
        with self._locked():
            fields = self._read_slot(ref.slot) if 0 <= ref.slot < self._max_objects else None
        if fields is None or fields[0] != ref.generation:
            return "free"
        return _STATE_NAMES[fields[4]]

    @property
    def owned_here(self) -> bool:
        """True in the process that created the store (not in its fork
        children, nor in processes it was passed to)."""
        return self._arena.owner_pid == os.getpid()

    def held_by_others(self) -> bool:
        """True if a process other than this one holds some object now (a
        vectorised look at the holder masks: cheap enough to ask while
        waiting for space)."""
        mask = ((1 << 128) - 1) & ~(1 << self._index)        # every index but ours
        lo, hi = np.uint64(mask & (2**64 - 1)), np.uint64(mask >> 64)
        with self._locked():
            words = _slot_words(self._buf, self._slots, self._max_objects)
            others = bool((words[:, 5] & lo).any() or (words[:, 6] & hi).any())
            del words
        return others

    def usage_by_process(self) -> dict[int, tuple[int, int]]:
        """``{pid: (objects, bytes)}`` that each attached process holds now
        (an object held by several processes counts for each)."""
        usage: dict[int, list[int]] = {}
        with self._locked():
            pids = [_U64.unpack_from(self._buf, self._proc_at(i))[0]
                    for i in range(MAX_PROCESSES)]
            for slot in range(self._max_objects):
                fields = self._read_slot(slot)
                if fields[4] == FREE:
                    continue
                mask = fields[6] | fields[7] << 64
                while mask:
                    index = (mask & -mask).bit_length() - 1
                    mask &= mask - 1
                    entry = usage.setdefault(pids[index], [0, 0])
                    entry[0] += 1
                    entry[1] += fields[3]
        return {pid: (n, nbytes) for pid, (n, nbytes) in usage.items() if pid}

    def record_fallback(self) -> int:
        """Count one value sent in-band because the store was full."""
        with self._locked():
            at = self._table + _T_FALLBACKS
            count = _U64.unpack_from(self._buf, at)[0] + 1
            self._put64(at, count)
        return count

    def statistics(self) -> StoreStatistics:
        with self._locked():
            a = self._alloc.statistics()
            live = _U64.unpack_from(self._buf, self._table + _T_LIVE)[0]
            fallbacks = _U64.unpack_from(self._buf, self._table + _T_FALLBACKS)[0]
            procs = sum(1 for i in range(MAX_PROCESSES)
                        if _U64.unpack_from(self._buf, self._proc_at(i))[0])
        return StoreStatistics(
            capacity=a.capacity, in_use=a.in_use, peak_in_use=a.peak_in_use,
            live_objects=live, largest_free_block=a.largest_free_block,
            committed=a.committed, fallbacks=fallbacks, attached_processes=procs,
            lock_takeovers=a.lock_takeovers, repairs=a.repairs,
            max_objects=self._max_objects)

    # -- repair and invariants ---------------------------------------------

    def _repair_locked(self) -> None:
        """After a lock takeover: rebuild the free-slot list and live count
        from slot states, free blocks no slot refers to, and free objects
        nothing holds (a holder died between two steps of freeing them)."""
        referenced = {self._table}
        free_slots = []
        live = 0
        for slot in range(self._max_objects):
            fields = self._read_slot(slot)
            if fields[4] == FREE:
                free_slots.append(slot)
            else:
                referenced.add(fields[1])
                live += 1
        head = 0
        for slot in reversed(free_slots):
            self._put64(self._slot_at(slot) + 8, head)
            head = slot + 1
        self._put64(self._table + _T_FREE_HEAD, head)
        self._put64(self._table + _T_LIVE, live)
        for payload, used in list(self._alloc.blocks()):
            if used and payload not in referenced:
                self._alloc.free_locked(payload)
        for slot in range(self._max_objects):
            self._maybe_free_locked(slot)

    def _check_invariants(self) -> None:
        """Assert the allocator's invariants and the table's: every non-free
        slot owns a distinct allocated block, the free-slot list holds exactly
        the free slots, the live count matches."""
        with self._locked():
            self._alloc._check_invariants()
            used_blocks = {p for p, used in self._alloc.blocks() if used}
            seen_blocks = {self._table}
            live = 0
            free_slots = set()
            for slot in range(self._max_objects):
                fields = self._read_slot(slot)
                if fields[4] == FREE:
                    free_slots.add(slot)
                    continue
                live += 1
                assert fields[1] in used_blocks, f"slot {slot} points at a free block"
                assert fields[1] not in seen_blocks, f"slot {slot} shares a block"
                seen_blocks.add(fields[1])
            assert seen_blocks == used_blocks, "allocated block owned by no slot"
            assert live == _U64.unpack_from(self._buf, self._table + _T_LIVE)[0]
            listed = set()
            nxt = _U64.unpack_from(self._buf, self._table + _T_FREE_HEAD)[0]
            while nxt:
                assert nxt - 1 in free_slots and nxt - 1 not in listed, "free-slot list"
                listed.add(nxt - 1)
                nxt = _U64.unpack_from(self._buf, self._slot_at(nxt - 1) + 8)[0]
            assert listed == free_slots, "free slot missing from the list"
            # Lifetime rules: every holder bit names a claimed entry, and an
            # object being created is held by its creator.
            claimed = 0
            for index in range(MAX_PROCESSES):
                if _U64.unpack_from(self._buf, self._proc_at(index))[0]:
                    claimed |= 1 << index
            for slot in range(self._max_objects):
                fields = self._read_slot(slot)
                if fields[4] == FREE:
                    continue
                holders = fields[6] | fields[7] << 64
                assert not holders & ~claimed, f"slot {slot} held by a free index"
                if fields[4] == CREATED:
                    assert holders >> fields[8] & 1, f"slot {slot} created by a non-holder"

    # -- lifecycle ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(self._closed_why)
        if self._pid != os.getpid():
            raise ClosedError("this store was not re-attached after fork")

    def __enter__(self) -> "RawStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _HeldLock:
    """``with _HeldLock(alloc):`` around a section whose arena lock the
    caller has just taken: released on exit, and left marked for repair
    unless the section ended clean (no exception, or one of CLEAN_EXITS,
    which are raised before any shared write)."""

    __slots__ = ("_alloc",)

    def __init__(self, alloc: FreeListAllocator) -> None:
        self._alloc = alloc

    def __enter__(self) -> None:
        pass

    def __exit__(self, exc_type, exc, tb) -> None:
        self._alloc.unlock(consistent=exc_type is None or issubclass(exc_type, CLEAN_EXITS))


class _DrainingLock:
    """``with store._locked():`` the arena lock, draining deferred releases;
    released as ``_HeldLock`` releases it."""

    __slots__ = ("_store",)

    def __init__(self, store: RawStore) -> None:
        self._store = store

    def __enter__(self):
        alloc = self._store._alloc
        alloc.lock()
        try:
            self._store._drain_deferred_locked()
        except BaseException as exc:
            alloc.unlock(consistent=isinstance(exc, CLEAN_EXITS))
            raise

    def __exit__(self, exc_type, exc, tb):
        _HeldLock(self._store._alloc).__exit__(exc_type, exc, tb)


# Rule 3's hooks.  _fd_guard is held from before a fork until after it, and
# while a store opens or closes its liveness description: a fork never
# copies a description that is not yet, or no longer, recorded.  It is taken
# before the arena lock, never after.
_fd_guard = threading.Lock()


def _before_fork() -> None:
    _fd_guard.acquire()
    for store in list(_open_stores):
        try:
            store._before_fork()
        except Exception:
            pass        # the child finds that store unusable (_after_fork_in_child)


def _after_fork_in_parent() -> None:
    try:
        for store in list(_open_stores):
            store._after_fork_in_parent()
    finally:
        _fd_guard.release()


def _after_fork_in_child() -> None:
    global _fd_guard
    _fd_guard = threading.Lock()           # the inherited one is held
    for store in list(_open_stores):
        store._after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
