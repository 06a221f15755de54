"""Model-based tests of the in-arena allocator and of RawStore lifetimes.

- ``AllocatorModel``: random allocate/free against a FreeListAllocator,
  checked against a plain dict of live blocks (no overlap, payloads
  survive, counters and every arena invariant hold after each step).
- ``StoreModel``: put/get/release/drop-view against a RawStore, checked
  against a model of which objects are alive (owning ref unreleased, or a
  view of it still alive).
- ``test_two_processes_share_one_arena``: two processes run random
  allocate/free loops on the same arena at the same time.
"""

from __future__ import annotations

import gc
import multiprocessing
import random
import traceback
from dataclasses import dataclass

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from conftest import DEADLOCK_TIMEOUT, START_METHODS
from shmpool._allocator import (
    ALIGNMENT,
    BLOCK_HEADER,
    BLOCK_OVERHEAD,
    MIN_BLOCK,
    FreeListAllocator,
    block_size_for,
)
from shmpool._arena import Arena
from shmpool._errors import ObjectNotFoundError, ObjectStateError, StoreFullError
from shmpool._store import ObjectRef, RawStore, object_payload

ARENA_CAPACITY = 256 * 1024
#: Small, with few slots, so that runs of 50 steps do fill the store (by
#: space or by slots) now and then.
STORE_CAPACITY = 256 * 1024
STORE_MAX_OBJECTS = 16

#: Steps per run; the number of runs comes from the loaded profile.
STATEFUL_SETTINGS = settings(stateful_step_count=50, deadline=None)


def _pattern(off: int, serial: int) -> int:
    """Fill byte of a block: derived from its offset and allocation serial,
    never 0 (fresh memory) so an unwritten or zeroed payload shows."""
    return ((off // ALIGNMENT) * 131 + serial * 29) % 255 + 1


def _assert_allocation_could_fail(alloc: FreeListAllocator, nbytes: int) -> None:
    """try_allocate(nbytes) returned None: assert that no free block could
    have held it (the allocator's promise: if one can, the request gets it)."""
    need = block_size_for(nbytes)
    fitting = [size for _, size, used in alloc._walk() if not used and size >= need]
    assert not fitting, (
        f"allocating {nbytes} bytes (block {need}) failed although free blocks "
        f"{fitting} fit")


# ---------------------------------------------------------------------------
# The allocator alone
# ---------------------------------------------------------------------------

_sizes = st.one_of(
    st.integers(0, 16384),
    st.integers(0, 16384),
    st.integers(0, 200 * 1024),
)


class AllocatorModel(RuleBasedStateMachine):
    """FreeListAllocator against a dict ``payload offset -> (nbytes, byte)``."""

    blocks = Bundle("blocks")

    def __init__(self) -> None:
        super().__init__()
        self.arena = Arena.create(ARENA_CAPACITY)
        try:
            self.alloc = FreeListAllocator.format(self.arena)
        except BaseException:
            self.arena.close()
            raise
        self.buf = self.arena.buf
        self.heap_size = self.alloc.statistics().capacity
        self.heap_start = self.alloc.heap_end - self.heap_size
        self.model: dict[int, tuple[int, int]] = {}      # off -> (nbytes, byte)
        self.freed: list[int] = []                        # offsets given back
        self.serial = 0

    # -- helpers -------------------------------------------------------------

    def _extent(self, off: int) -> tuple[int, int]:
        """The whole block of payload *off*: header, payload, footer."""
        return off - BLOCK_HEADER, off + self.alloc.payload_size(off) + 8

    def _check_pattern(self, off: int) -> None:
        nbytes, byte = self.model[off]
        usable = self.alloc.payload_size(off)
        got = bytes(self.buf[off:off + usable])
        assert got == bytes([byte]) * usable, (
            f"payload of block {off} ({nbytes} bytes asked, {usable} usable) "
            f"was overwritten: first bad byte at +"
            f"{next(i for i, b in enumerate(got) if b != byte)}")

    def _record(self, off: int, nbytes: int) -> int:
        assert off % ALIGNMENT == 0, f"payload {off} is not {ALIGNMENT}-byte aligned"
        assert off not in self.model, f"offset {off} handed out twice"
        usable = self.alloc.payload_size(off)
        need = block_size_for(nbytes)
        # A remainder too small to split (< MIN_BLOCK) stays in the block.
        assert nbytes <= usable <= need - BLOCK_OVERHEAD + (MIN_BLOCK - ALIGNMENT), (
            f"payload {off}: {usable} usable bytes for a request of {nbytes}")
        lo, hi = self._extent(off)
        assert self.heap_start <= lo and hi <= self.alloc.heap_end, (
            f"block [{lo}, {hi}) outside the heap")
        for other, (n, _) in self.model.items():
            assert off + nbytes <= other or other + n <= off, (
                f"new payload [{off}, {off + nbytes}) overlaps live payload "
                f"[{other}, {other + n})")
            olo, ohi = self._extent(other)
            assert hi <= olo or ohi <= lo, (
                f"new block [{lo}, {hi}) overlaps live block [{olo}, {ohi})")
        self.serial += 1
        byte = _pattern(off, self.serial)
        self.buf[off:off + usable] = bytes([byte]) * usable
        self.model[off] = (nbytes, byte)
        return off

    # -- rules -----------------------------------------------------------------

    @rule(target=blocks, nbytes=_sizes)
    def allocate(self, nbytes):
        off = self.alloc.try_allocate(nbytes)
        if off is None:                  # full is legal, if it is really full
            event("allocate: arena full")
            _assert_allocation_could_fail(self.alloc, nbytes)
            return multiple()
        return self._record(off, nbytes)

    @rule(target=blocks, over=st.booleans())
    def allocate_whole_heap(self, over):
        """The largest payload the heap can ever hold, and one byte more."""
        biggest = self.heap_size - BLOCK_OVERHEAD
        if over:
            with pytest.raises(StoreFullError):
                self.alloc.try_allocate(biggest + 1)
            return multiple()
        off = self.alloc.try_allocate(biggest)
        if off is None:
            assert self.model, "an empty heap refused its largest payload"
            _assert_allocation_could_fail(self.alloc, biggest)
            return multiple()
        assert not self.model, "the whole heap was handed out while blocks are live"
        return self._record(off, biggest)

    @rule(off=consumes(blocks))
    def free(self, off):
        self._check_pattern(off)
        del self.model[off]
        self.alloc.free(off)
        self.freed.append(off)

    @rule(data=st.data())
    def double_free_is_refused(self, data):
        """Freeing an offset again, while it lies in free space (also once
        merged into a neighbour), is an error that changes nothing."""
        in_free_space = [off for off in self.freed
                         if not any(lo <= off - BLOCK_HEADER < hi
                                    for lo, hi in map(self._extent, self.model))]
        if not in_free_space:
            return
        off = data.draw(st.sampled_from(in_free_space))
        with pytest.raises(ObjectStateError):
            self.alloc.free(off)

    @rule(nbytes=st.integers(-3, -1))
    def negative_size_is_refused(self, nbytes):
        with pytest.raises(ValueError):
            self.alloc.try_allocate(nbytes)

    # -- invariants ----------------------------------------------------------

    @invariant()
    def arena_is_consistent(self):
        self.alloc._check_invariants()
        stats = self.alloc.statistics()
        assert stats.live_blocks == len(self.model)
        assert stats.in_use == sum(self.alloc.payload_size(off) + BLOCK_OVERHEAD
                                   for off in self.model)
        assert stats.capacity == self.heap_size
        for off in self.model:
            self._check_pattern(off)

    def teardown(self):
        try:
            for off in list(self.model):
                self._check_pattern(off)
                del self.model[off]
                self.alloc.free(off)
            self.alloc._check_invariants()
            stats = self.alloc.statistics()
            assert stats.in_use == 0
            assert stats.live_blocks == 0
            assert stats.largest_free_block == stats.capacity - BLOCK_OVERHEAD, (
                "free space did not coalesce back into one block")
        finally:
            self.buf = None
            self.arena.close()


AllocatorModel.TestCase.settings = STATEFUL_SETTINGS
TestAllocatorModel = AllocatorModel.TestCase


# ---------------------------------------------------------------------------
# RawStore object lifetimes
# ---------------------------------------------------------------------------

@dataclass
class _Obj:
    ref: ObjectRef            # a borrowed copy (keeps nothing alive)
    owner: ObjectRef | None   # the owning ref, until released
    nbytes: int
    byte: int
    views: int = 0

    @property
    def alive(self) -> bool:
        return self.owner is not None or self.views > 0


class StoreModel(RuleBasedStateMachine):
    """RawStore against a model: an object lives while its owning ref is
    unreleased or a view of it is alive.  The store is read-only, so that
    every view holds its object (a copy-on-write view of an object under a
    page is a private copy; tests/property/test_copy_on_write_model.py
    covers copy-on-write views)."""

    refs = Bundle("refs")

    def __init__(self) -> None:
        super().__init__()
        self.store = RawStore(STORE_CAPACITY, max_objects=STORE_MAX_OBJECTS, readonly=True)
        self.baseline = self.store.statistics().in_use       # the object table
        self.objects: dict[tuple[int, int], _Obj] = {}       # live objects
        self.views: list[tuple[tuple[int, int], memoryview]] = []
        self.dead: list[ObjectRef] = []                      # borrowed refs of freed objects
        self.serial = 0

    # -- helpers -------------------------------------------------------------

    @staticmethod
    def _key(ref: ObjectRef) -> tuple[int, int]:
        return ref.slot, ref.generation

    def _check_view(self, obj: _Obj, view: memoryview) -> None:
        assert view.readonly == self.store.readonly     # else copy-on-write
        assert view.nbytes == obj.nbytes
        assert view.tobytes() == bytes([obj.byte]) * obj.nbytes, (
            f"object {obj.ref!r} changed under a view")

    def _settle(self, key: tuple[int, int]) -> None:
        """After a hold went away: if the model says the object died, the
        store must have freed it."""
        obj = self.objects[key]
        if obj.alive:
            assert self.store.state_of(obj.ref) == "sealed"
            return
        del self.objects[key]
        self.dead.append(obj.ref)
        assert self.store.state_of(obj.ref) == "free", (
            f"{obj.ref!r} outlived its last hold")
        with pytest.raises(ObjectNotFoundError):
            self.store.get(obj.ref)

    # -- rules -----------------------------------------------------------------

    @rule(target=refs, nbytes=st.one_of(st.integers(0, 32 * 1024),
                                        st.integers(24 * 1024, 32 * 1024)))
    def put(self, nbytes):
        try:
            builder = self.store.create(nbytes, timeout=0)
        except StoreFullError:
            stats = self.store.statistics()
            if stats.live_objects < stats.max_objects:
                event("put: store full (space)")
                _assert_allocation_could_fail(self.store._alloc, object_payload(nbytes))
            else:
                event("put: store full (slots)")
            return multiple()
        self.serial += 1
        byte = self.serial % 255 + 1
        view = builder.view
        assert not view.readonly and view.nbytes == nbytes
        view[:] = bytes([byte]) * nbytes
        owner = builder.seal()
        assert owner.owned
        del view, builder              # drops the writable view's hold
        ref = ObjectRef(owner.token, owner.slot, owner.generation)
        key = self._key(ref)
        assert key not in self.objects
        self.objects[key] = _Obj(ref=ref, owner=owner, nbytes=nbytes, byte=byte)
        assert self.store.state_of(ref) == "sealed"
        return owner

    @rule(ref=refs)
    def get(self, ref):
        obj = self.objects[self._key(ref)]
        view = self.store.get(ref)
        self._check_view(obj, view)
        obj.views += 1
        self.views.append((self._key(ref), view))

    @precondition(lambda self: any(o.owner is None for o in self.objects.values()))
    @rule(data=st.data())
    def get_pinned(self, data):
        """A released object that a view still pins can still be read."""
        pinned = sorted(k for k, o in self.objects.items() if o.owner is None)
        key = data.draw(st.sampled_from(pinned), label="pinned object")
        obj = self.objects[key]
        view = self.store.get(obj.ref)
        self._check_view(obj, view)
        obj.views += 1
        self.views.append((key, view))

    @rule(ref=consumes(refs))
    def release(self, ref):
        key = self._key(ref)
        obj = self.objects[key]
        assert ref.owned
        self.store.release(ref)
        assert not ref.owned
        obj.owner = None
        with pytest.raises(ObjectStateError):
            self.store.release(ref)
        for k, view in self.views:          # views keep it readable
            if k == key:
                self._check_view(obj, view)
        self._settle(key)

    @precondition(lambda self: self.views)
    @rule(data=st.data(), how=st.sampled_from(["del", "gc", "gc_under_lock"]))
    def drop_view(self, data, how):
        """Drop a view: by refcount ("del"), or left in a garbage cycle that
        only the collector frees ("gc"), or freed by a collection that runs
        while this thread holds the arena lock ("gc_under_lock": the release
        is deferred to the next locked call, CPython issue 12352)."""
        i = data.draw(st.integers(0, len(self.views) - 1), label="view index")
        key, view = self.views.pop(i)
        obj = self.objects[key]
        self._check_view(obj, view)
        if how == "del":
            del view
        else:
            cycle = [view]
            cycle.append(cycle)
            del view, cycle
            # The cycle is young garbage: a generation-0 collection frees it
            # (a full one costs ~20 ms with Hypothesis's heap around).
            if how == "gc":
                gc.collect(0)
            else:
                with self.store._locked():
                    gc.collect(0)
        obj.views -= 1
        self._settle(key)

    @precondition(lambda self: self.dead)
    @rule(data=st.data())
    def stale_ref_is_refused(self, data):
        ref = data.draw(st.sampled_from(self.dead), label="stale ref")
        with pytest.raises(ObjectNotFoundError):
            self.store.get(ref)
        assert self.store.state_of(ref) == "free"
        assert not self.store.contains(ref)

    # -- invariants ----------------------------------------------------------

    @invariant()
    def store_is_consistent(self):
        self.store._check_invariants()
        stats = self.store.statistics()
        assert stats.live_objects == len(self.objects)
        # Each object is one block: at least its size, at most one
        # unsplittable remainder more.
        low = sum(block_size_for(object_payload(o.nbytes)) for o in self.objects.values())
        extra = (MIN_BLOCK - ALIGNMENT) * len(self.objects)
        assert low <= stats.in_use - self.baseline <= low + extra

    def teardown(self):
        try:
            for obj in list(self.objects.values()):
                if obj.owner is not None:
                    self.store.release(obj.owner)
                    obj.owner = None
            self.views.clear()
            self.objects.clear()
            # Every view already died by refcount or in drop_view's
            # collection, so the young generations are all there is to
            # collect; a full collection walks Hypothesis's whole heap (~20 ms
            # a run, growing) and made the expensive profile crawl.
            gc.collect(1)
            stats = self.store.statistics()
            assert stats.live_objects == 0
            assert stats.in_use == self.baseline
            self.store._check_invariants()
        finally:
            self.views.clear()
            self.store.close()


StoreModel.TestCase.settings = STATEFUL_SETTINGS
TestStoreModel = StoreModel.TestCase


# ---------------------------------------------------------------------------
# Two processes on one arena
# ---------------------------------------------------------------------------

#: Small enough that the two processes often find it full.
TWO_PROCESS_CAPACITY = 512 * 1024
TWO_PROCESS_STEPS = 10000
MAX_LIVE = 64
MAX_SIZE = 8192


def _alloc_free_loop(alloc: FreeListAllocator, buf: memoryview, seed: int,
                     steps: int, who: int) -> int:
    """Random allocate/free on *alloc*; every block is filled with a byte of
    parity *who* (so the other process's bytes never match) and checked
    before it is freed.  Frees everything at the end.  Returns how many
    allocations found the arena full."""
    rng = random.Random(seed)
    live: dict[int, tuple[int, int]] = {}      # off -> (nbytes, byte)
    fulls = 0

    def check(off: int) -> None:
        nbytes, byte = live[off]
        got = bytes(buf[off:off + nbytes])
        if got != bytes([byte]) * nbytes:
            bad = next(i for i, b in enumerate(got) if b != byte)
            raise AssertionError(
                f"process {who}: payload [{off}, {off + nbytes}) overwritten at "
                f"+{bad}: {got[bad]:#x} instead of {byte:#x}")

    def free_one() -> None:
        off = rng.choice(list(live))
        check(off)
        del live[off]
        alloc.free(off)

    for step in range(steps):
        if live and (len(live) >= MAX_LIVE or rng.random() < 0.45):
            free_one()
            continue
        nbytes = rng.randint(0, MAX_SIZE)
        off = alloc.try_allocate(nbytes)
        if off is None:
            fulls += 1
            if live:
                free_one()
            continue
        assert off % ALIGNMENT == 0, f"process {who}: misaligned payload {off}"
        for other, (n, _) in live.items():
            assert off + nbytes <= other or other + n <= off, (
                f"process {who}: payload [{off}, {off + nbytes}) overlaps own "
                f"live payload [{other}, {other + n})")
        byte = (rng.randrange(1, 128) << 1) | who
        buf[off:off + nbytes] = bytes([byte]) * nbytes
        live[off] = (nbytes, byte)
        if step % 256 == 0:
            for o in live:
                check(o)
    while live:
        free_one()
    return fulls


def _child_main(arena: Arena, seed: int, steps: int, barrier, results) -> None:
    try:
        alloc = FreeListAllocator(arena)
        barrier.wait(DEADLOCK_TIMEOUT)
        fulls = _alloc_free_loop(alloc, arena.buf, seed, steps, who=1)
        results.put(("ok", fulls))
    except BaseException:
        results.put(("error", traceback.format_exc()))
        raise
    finally:
        arena.close()


@pytest.mark.parametrize("method", START_METHODS)
def test_two_processes_share_one_arena(method):
    ctx = multiprocessing.get_context(method)
    seed = random.randrange(2**32)
    arena = Arena.create(TWO_PROCESS_CAPACITY)
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    try:
        alloc = FreeListAllocator.format(arena)
        proc = ctx.Process(target=_child_main,
                           args=(arena, seed + 1, TWO_PROCESS_STEPS, barrier, results))
        proc.start()
        try:
            barrier.wait(DEADLOCK_TIMEOUT)
            _alloc_free_loop(alloc, arena.buf, seed, TWO_PROCESS_STEPS, who=0)
            status, detail = results.get(timeout=DEADLOCK_TIMEOUT)
        except BaseException as exc:
            exc.add_note(f"parent seed {seed}, child seed {seed + 1}")
            raise
        finally:
            barrier.abort()           # frees a child still waiting if we failed early
            proc.join(DEADLOCK_TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert status == "ok", f"child (seed {seed + 1}) failed:\n{detail}"
        assert proc.exitcode == 0, f"child exited with {proc.exitcode}"
        proc.close()
        alloc._check_invariants()
        stats = alloc.statistics()
        assert stats.in_use == 0, f"seed {seed}: {stats}"
        assert stats.live_blocks == 0, f"seed {seed}: {stats}"
        assert stats.largest_free_block == stats.capacity - BLOCK_OVERHEAD
    finally:
        results.close()
        results.join_thread()
        arena.close()
