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
drops it.  Views release their hold from a ``weakref.finalize`` on the
buffer *exporter* (a ctypes array), never on a memoryview: numpy and
memoryview re-export from the exporter, so it dies only with the last view.
A finalizer may run inside the garbage collector while this thread already
holds the lock (CPython issue 12352), so it never blocks: it tries the lock
and otherwise leaves the release to a drainer thread (started on the first
such deferral, woken through a pipe) that takes the lock and releases it
moments later.  So a release is never left waiting for a call that may not
come (an idle worker makes none).

Object table (one allocator block; native byte order)::

    +0  magic b"SHMPSTOR"   +8  last generation   +16 free slot head (index+1)
    +24 live objects        +32 fallbacks         +40 max objects
    +64 process table: MAX_PROCESSES x u64 pid (0 = free)
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

import numpy as np

from . import _posix
from ._allocator import FreeListAllocator
from ._arena import Arena
from ._errors import (
    ClosedError,
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
    """Times a process took the lock over from a holder that had died."""
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
    """

    def __init__(self, capacity: int | None = None, *, max_objects: int | None = None,
                 space_timeout: float = DEFAULT_SPACE_TIMEOUT) -> None:
        arena = Arena.create(capacity)
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
        self._closed = False
        self._local: dict[tuple[int, int], int] = {}       # (slot, gen) -> holds here
        self._deferred: list[tuple[int, int]] = []         # holds dropped by the GC
        self._exports: dict[int, tuple[int, int, int, int]] = {}  # addr -> end, slot, gen, data
        self._export_starts: list[int] | None = None
        self._drainer: tuple[threading.Thread, int] | None = None  # thread, pipe write end
        self._drainer_starting = threading.Lock()
        self._pid = os.getpid()
        alloc.add_repair_hook(self._repair_locked)
        with alloc.locked():
            self._index = self._claim_process_index_locked()
        _open_stores.add(self)
        self._close_at_exit()

    def _close_at_exit(self) -> None:
        # multiprocessing runs these finalizers when a worker process ends
        # (it leaves by os._exit, which skips atexit) and at interpreter
        # exit; the lowest priority runs them after pools have stopped.
        util.Finalize(self, RawStore.close, args=(self,), exitpriority=-10)
        util.register_after_fork(self, RawStore._close_at_exit)

    def __reduce__(self):
        self._check_open()
        return (RawStore._attach, (self._arena, self._table, self.space_timeout))

    # -- process table -----------------------------------------------------

    def _proc_at(self, index: int) -> int:
        return self._table + _PROC_TABLE + 8 * index

    def _claim_process_index_locked(self) -> int:
        free = None
        for index in range(MAX_PROCESSES):
            pid = _U64.unpack_from(self._buf, self._proc_at(index))[0]
            if pid and not _posix.process_is_alive(pid):
                self._release_process_locked(index)
                pid = 0
            if not pid and free is None:
                free = index
        if free is None:
            raise StoreFullError(
                f"{MAX_PROCESSES} live processes are attached to this store; "
                f"no more can attach (use fewer worker processes)")
        self._put64(self._proc_at(free), os.getpid())
        return free

    def _release_process_locked(self, index: int) -> None:
        """Drop every process hold of process *index* and free its entry."""
        word, bit = (5, 1 << index) if index < 64 else (6, 1 << (index - 64))
        words = _slot_words(self._buf, self._slots, self._max_objects)
        held = np.flatnonzero(words[:, word] & np.uint64(bit)).tolist()
        del words
        for slot in held:
            at = self._slot_at(slot)
            self._put64(at + 40 + 8 * (word - 5),
                           _U64.unpack_from(self._buf, at + 40 + 8 * (word - 5))[0] & ~bit)
            if _U32.unpack_from(self._buf, at + 32)[0] == CREATED:
                self._put32(at + 32, DELETED)       # a dead creator aborts
        for slot in held:
            self._maybe_free_locked(slot)
        self._put64(self._proc_at(index), 0)

    def reap_dead_processes(self) -> int:
        """Release every hold of every attached process that has died, and
        abort the objects they were still writing.  Returns how many were
        reaped.  Call it when a worker is known to have died."""
        self._check_open()
        reaped = 0
        with self._alloc.locked():
            for index in range(MAX_PROCESSES):
                pid = _U64.unpack_from(self._buf, self._proc_at(index))[0]
                if pid and not _posix.process_is_alive(pid):
                    self._release_process_locked(index)
                    reaped += 1
        return reaped

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
            raise TypeError(f"expected an ObjectRef, got {type(ref).__name__}")
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
                self._maybe_free_locked(slot)

    def _drain_deferred_locked(self) -> None:
        while self._deferred:
            self._unhold_locked(self._deferred.pop())

    def _release_from_gc(self, key: tuple[int, int]) -> None:
        # Runs from weakref.finalize: maybe inside the GC, maybe in a thread
        # that already holds the lock.  Never block here.
        if self._closed or os.getpid() != self._pid:
            return
        if self._alloc.try_lock():
            try:
                self._drain_deferred_locked()
                self._unhold_locked(key)
            finally:
                self._alloc.unlock()
        else:
            self._deferred.append(key)
            self._wake_drainer()

    def _wake_drainer(self) -> None:
        # Called from finalizers: only non-blocking steps (os.write to a
        # non-blocking pipe), never a lock another frame could hold.
        if self._drainer is None:
            if not self._drainer_starting.acquire(blocking=False):
                return                        # being started; it drains at start
            try:
                read_end, write_end = os.pipe()
                os.set_blocking(write_end, False)
                thread = threading.Thread(target=self._drain_forever, args=(read_end,),
                                          name="shmpool-release", daemon=True)
                thread.start()
                self._drainer = (thread, write_end)
            except RuntimeError:              # interpreter shutting down
                return
            finally:
                self._drainer_starting.release()
        try:
            os.write(self._drainer[1], b"x")
        except OSError:
            pass                              # already woken (pipe full), or closing

    def _drain_forever(self, read_end: int) -> None:
        try:
            while True:
                if self._deferred:
                    try:
                        with self._locked():
                            pass              # entering drains the deferred releases
                    except Exception:         # broken meanwhile: close() reports it
                        pass
                if not os.read(read_end, 4096):
                    return                    # close() closed the write end
        finally:
            os.close(read_end)

    def _stop_drainer(self) -> None:
        """End the drainer thread and wait for it: after this, no thread of
        this store touches the semaphore but the caller's."""
        drainer, self._drainer = self._drainer, None
        if drainer is not None:
            thread, write_end = drainer
            os.close(write_end)               # the drainer reads EOF and exits
            if thread is not threading.current_thread():
                thread.join()

    def _locked(self):
        self._check_open()
        return _DrainingLock(self)

    def _own(self, ref: ObjectRef) -> ObjectRef:
        """Attach a process hold (taken by the caller) to a fresh ref object."""
        owned = ObjectRef(ref.token, ref.slot, ref.generation)
        owned._hold = weakref.finalize(owned, self._release_from_gc, (ref.slot, ref.generation))
        owned._hold.atexit = False
        return owned

    def _export(self, slot: int, gen: int, data: int, nbytes: int, *, writable: bool):
        """A view of the object's data whose life holds the object."""
        exporter = self._arena.export(data, nbytes)
        key = (slot, gen)
        start = self._arena.address + data
        self._exports[start] = (start + nbytes, slot, gen, data)
        self._export_starts = None
        fin = weakref.finalize(exporter, self._drop_export, start, key)
        fin.atexit = False
        view = memoryview(exporter).cast("B")
        return view if writable else view.toreadonly()

    def _drop_export(self, start: int, key: tuple[int, int]) -> None:
        entry = self._exports.get(start)
        if entry is not None and (entry[1], entry[2]) == key:
            del self._exports[start]
            self._export_starts = None
        self._release_from_gc(key)

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
        total = deps_bytes + nbytes
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
        slot, gen, data = made
        ref = ObjectRef(self.token, slot, gen)
        return ObjectBuilder(self, ref, self._export(slot, gen, data, nbytes, writable=True))

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
        self._put64(at + 16, block + deps_bytes)
        self._put64(at + 24, nbytes)
        self._put32(at + 36, 0)
        self._set_holders(slot, 1 << self._index)
        self._put32(at + 56, self._index)
        self._put32(at + 60, len(depends_on))
        self._put32(at + 32, CREATED)
        self._local[(slot, gen)] = 1      # the writable view's hold
        self._add_live(1)
        return slot, gen, block + deps_bytes

    def seal(self, ref: ObjectRef) -> ObjectRef:
        """Make a created object immutable and visible to ``get``; return an
        owning ref.  Raises ObjectStateError if it is not in created state."""
        with self._locked():
            self._validate_locked(ref, CREATED)
            self._put32(self._slot_at(ref.slot) + 32, SEALED)
            self._hold_locked(ref.slot, ref.generation)
        return self._own(ref)

    def abort(self, ref: ObjectRef) -> None:
        """Discard a created object: as if it had never been created.  Its
        memory returns once its writable views are gone."""
        with self._locked():
            self._validate_locked(ref, CREATED)
            self._put32(self._slot_at(ref.slot) + 32, DELETED)
            self._maybe_free_locked(ref.slot)

    def get(self, ref: ObjectRef) -> memoryview:
        """Return a read-only view of a sealed object's bytes, zero-copy.

        The object stays (not freed, memory not reused) until this view and
        every view derived from it (slices, numpy arrays, casts) are gone.

        Raises:
            ObjectNotFoundError: stale, forged, foreign or deleted ref.
            ObjectStateError: the object is not sealed yet.
        """
        with self._locked():
            fields = self._validate_locked(ref, SEALED)
            self._hold_locked(ref.slot, ref.generation)
        return self._export(ref.slot, ref.generation, fields[2], fields[3], writable=False)

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
            self._hold_locked(ref.slot, ref.generation)
            self._put32(self._slot_at(ref.slot) + 36, fields[5] - 1)
        return self._own(ref)

    # -- lookups -----------------------------------------------------------

    @property
    def has_views(self) -> bool:
        """True if this process holds any view of this store (``locate`` can
        only find buffers in those)."""
        return bool(self._exports)

    def locate(self, address: int, nbytes: int) -> tuple[ObjectRef, int] | None:
        """If ``[address, address + nbytes)`` lies in an object this process
        holds a view of, return ``(borrowed ref, offset in the object)``."""
        starts = self._export_starts
        if starts is None:
            starts = self._export_starts = sorted(self._exports)
        i = bisect.bisect_right(starts, address) - 1
        if i < 0:
            return None
        entry = self._exports.get(starts[i])
        if entry is None or address + nbytes > entry[0]:
            return None
        _, slot, gen, _ = entry
        return ObjectRef(self.token, slot, gen), address - starts[i]

    def state_of(self, ref: ObjectRef) -> str:
        """'created', 'sealed', 'deleted' or 'free' (stale)."""
        with self._locked():
            fields = self._read_slot(ref.slot) if 0 <= ref.slot < self._max_objects else None
        if fields is None or fields[0] != ref.generation:
            return "free"
        return _STATE_NAMES[fields[4]]

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
            lock_takeovers=a.lock_takeovers, max_objects=self._max_objects)

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

    # -- lifecycle ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this store is closed (create a new one)")
        if self._pid != os.getpid():
            raise ClosedError("this store was not re-attached after fork")

    def close(self) -> None:
        """Detach this process: release its holds, drop its mapping.  In the
        owner, also remove the store's name (other processes keep working
        until they close too).  Views handed out stay readable.  Idempotent."""
        if self._closed:
            return
        if os.getpid() == self._pid:
            self._stop_drainer()              # before anything else uses the lock
        if os.getpid() == self._pid and not self._arena.closed:
            try:
                if self._alloc.try_lock() or self._lock_quietly():
                    try:
                        self._release_process_locked(self._index)
                    finally:
                        self._alloc.unlock()
            except Exception:
                pass       # a broken arena must not stop the close
        self._closed = True
        _open_stores.discard(self)
        self._local.clear()
        self._deferred.clear()
        self._exports.clear()
        self._arena.close()

    def _lock_quietly(self) -> bool:
        self._alloc.lock()
        return True

    def __enter__(self) -> "RawStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def forget_inherited_holds(self) -> None:
        """Give up every hold this process inherited through fork.

        For processes that get their store data as arguments, as a pool
        worker does: the parent's objects are then freed when the parent
        drops them, instead of living as long as the child.  Views the child
        inherited must not be used afterwards; nor can they be put again
        without a copy.
        """
        with self._locked():
            self._release_process_locked(self._index)
            self._put64(self._proc_at(self._index), os.getpid())
            self._local.clear()
            self._exports.clear()
            self._export_starts = None

    def _after_fork_in_child(self) -> None:
        # The child inherits the parent's local holds (its views and owning
        # refs are still alive here) but not the parent's process bit: take
        # an index of its own and hold every inherited object under it.
        self._pid = os.getpid()
        if self._drainer is not None:         # the thread did not survive fork
            os.close(self._drainer[1])
            self._drainer = None
        self._drainer_starting = threading.Lock()
        pending = self._deferred
        self._deferred = []
        for key in pending:
            count = self._local.get(key, 0) - 1
            if count > 0:
                self._local[key] = count
            else:
                self._local.pop(key, None)
        with self._alloc.locked():
            self._index = self._claim_process_index_locked()
            bit = 1 << self._index
            for slot, gen in list(self._local):
                if _U64.unpack_from(self._buf, self._slot_at(slot))[0] == gen:
                    self._set_holders(slot, self._holders(slot) | bit)
                else:
                    del self._local[(slot, gen)]


class _DrainingLock:
    """``with store._locked():`` the arena lock, draining deferred releases."""

    __slots__ = ("_store",)

    def __init__(self, store: RawStore) -> None:
        self._store = store

    def __enter__(self):
        self._store._alloc.lock()
        try:
            self._store._drain_deferred_locked()
        except BaseException:
            self._store._alloc.unlock()
            raise

    def __exit__(self, *exc):
        self._store._alloc.unlock()


def _after_fork_in_child() -> None:
    for store in list(_open_stores):
        if not store.closed:
            store._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)