"""RawStore and ObjectStore in one process: lifecycle, holds and bad input."""

import gc
import pickle
import random
import time

import numpy as np
import pytest

import shmpool
from shmpool import ObjectRef, testing
from shmpool._store import RawStore


def test_create_seal_get_roundtrip():
    with RawStore(1 << 20) as store:
        builder = store.create(5)
        builder.view[:] = b"hello"
        ref = builder.seal()
        view = store.get(ref)
        assert bytes(view) == b"hello" and not view.readonly   # a private copy
        view[0] = ord("j")
        assert bytes(store.get(ref)) == b"hello"
        assert store.contains(ref)


def test_builder_context_manager_seals_or_aborts():
    with RawStore(1 << 20) as store:
        with store.create(3) as ok:
            ok.view[:] = b"abc"
        assert store.contains(ok.ref)
        with pytest.raises(RuntimeError):
            with store.create(3) as failed:
                raise RuntimeError("writer failed")
        assert store.state_of(failed.ref) in ("deleted", "free")
        with pytest.raises(shmpool.ObjectNotFoundError):
            store.get(failed.ref)


def test_object_freed_when_last_hold_goes(store):
    baseline = store.statistics()
    ref = store.put(np.arange(1000))
    view = store.get(ref)
    store.release(ref)
    assert store.statistics().live_objects == baseline.live_objects + 1
    derived = view[10:20]
    del view
    gc.collect()
    assert derived[0] == 10
    del derived
    after = store.statistics()
    assert after.live_objects == baseline.live_objects
    assert after.in_use == baseline.in_use


def test_owning_ref_garbage_collected_frees_object(store):
    baseline = store.statistics().in_use
    ref = store.put(np.ones(10_000))
    assert store.statistics().in_use > baseline
    del ref
    gc.collect()
    assert store.statistics().in_use == baseline


def test_release_twice_and_release_borrowed_are_refused(store):
    ref = store.put(b"x")
    borrowed = pickle.loads(pickle.dumps(ref))
    assert borrowed == ref and not borrowed.owned
    with pytest.raises(shmpool.ObjectStateError, match="holds nothing"):
        store.release(borrowed)
    store.release(ref)
    with pytest.raises(shmpool.ObjectStateError):
        store.release(ref)


def test_delete_hides_object_but_keeps_views(store):
    ref = store.put(np.arange(100))
    arr = store.get(ref)
    store.delete(ref)
    assert not store.contains(ref)
    with pytest.raises(shmpool.ObjectNotFoundError):
        store.get(ref)
    assert arr.sum() == 4950


def test_seal_twice_and_abort_sealed_are_state_errors():
    with RawStore(1 << 20) as store:
        builder = store.create(8)
        builder.seal()
        with pytest.raises(shmpool.ObjectStateError, match="sealed"):
            store.seal(builder.ref)
        with pytest.raises(shmpool.ObjectStateError):
            store.abort(builder.ref)


def test_get_of_unsealed_object_is_refused():
    with RawStore(1 << 20) as store:
        builder = store.create(8)
        with pytest.raises(shmpool.ObjectStateError, match="created"):
            store.get(builder.ref)
        builder.abort()


def test_ref_pickles_to_a_few_dozen_bytes(store):
    ref = store.put(np.zeros(1 << 20))
    assert len(pickle.dumps(ref)) < 80


# -- bad input -----------------------------------------------------------

@pytest.mark.parametrize("bad", [lambda: 1, (i for i in range(3))])
def test_unpicklable_object_raises_serialization_error_and_leaks_nothing(store, bad):
    baseline = store.statistics()
    with pytest.raises(shmpool.SerializationError) as info:
        store.put({"payload": np.zeros(100_000), "bad": bad})
    assert "dict" in str(info.value)
    assert info.value.__cause__ is not None
    assert isinstance(info.value, pickle.PicklingError)
    after = store.statistics()
    assert (after.in_use, after.live_objects) == (baseline.in_use, baseline.live_objects)
    testing.check_invariants(store)


def test_object_that_fails_while_unpickling_raises_serialization_error(store):
    ref = store.put(testing.FailsToUnpickle())
    with pytest.raises(shmpool.SerializationError, match="refusing to unpickle"):
        store.get(ref)


def test_zero_sized_objects(store):
    with RawStore(1 << 20) as raw:
        ref = raw.create(0).seal()
        assert bytes(raw.get(ref)) == b""
    assert store.get(store.put(b"")) == b""
    empty = store.empty((0, 3))
    assert empty.shape == (0, 3)
    got = store.get(store.put(empty))
    assert got.shape == (0, 3)


def test_negative_and_non_integer_sizes_are_refused():
    with RawStore(1 << 20) as raw:
        with pytest.raises(ValueError, match="nbytes must be >= 0"):
            raw.create(-1)
        with pytest.raises(TypeError):
            raw.create(1.5)


def test_huge_object_fails_fast_with_sizes_in_message():
    with RawStore(1 << 20, space_timeout=30) as raw:
        started = time.monotonic()
        with pytest.raises(shmpool.StoreFullError, match=r"cannot allocate \d+ bytes.*capacity="):
            raw.create(1 << 40)
        assert time.monotonic() - started < 5      # no wait for space that can never come


def test_store_capacity_beyond_dev_shm_is_refused():
    with pytest.raises(shmpool.StoreFullError, match="/dev/shm has only"):
        RawStore(1 << 62)


def test_stale_ref_after_free_and_slot_reuse(store):
    ref = store.put(b"first")
    stale = pickle.loads(pickle.dumps(ref))
    store.release(ref)
    newer = store.put(b"second")
    assert newer.slot == stale.slot            # the slot was reused
    with pytest.raises(shmpool.ObjectNotFoundError, match="no live object"):
        store.get(stale)
    assert store.get(newer) == b"second"


@pytest.mark.parametrize("forge", ["slot", "generation", "token", "huge-slot", "negative-slot"])
def test_forged_refs_are_refused_without_reading(store, forge):
    real = store.put(b"secret")
    fields = {"token": real.token, "slot": real.slot, "generation": real.generation}
    if forge == "slot":
        fields["slot"] += 1
    elif forge == "generation":
        fields["generation"] += random.randint(1, 1000)
    elif forge == "token":
        fields["token"] ^= 1
    elif forge == "huge-slot":
        fields["slot"] = 1 << 40
    else:
        fields["slot"] = -1
    with pytest.raises(shmpool.ObjectNotFoundError):
        store.get(ObjectRef(**fields))


def test_use_after_close_raises_closed_error():
    store = shmpool.ObjectStore(1 << 20)
    ref = store.put(b"x")
    store.close()
    store.close()                                 # idempotent
    for call in (lambda: store.put(b"y"), lambda: store.get(ref), store.statistics,
                 lambda: store.empty(3)):
        with pytest.raises(shmpool.ClosedError):
            call()


def test_views_survive_close_of_their_store():
    store = shmpool.ObjectStore(1 << 20)
    arr = store.get(store.put(np.arange(1000)))
    store.close()
    assert arr.sum() == 499500                    # still mapped until the view dies


def test_finalizer_while_lock_held_defers_release(store):
    raw = testing.raw_store(store)
    baseline = store.statistics()
    ref = store.put(np.ones(1000))
    view = store.get(ref)
    store.release(ref)
    with raw._alloc.locked():                     # as if the GC ran inside a locked call
        del view
        gc.collect()
        assert raw._deferred                      # deferred, and no deadlock
    # The drainer thread releases it moments later, with no call from here.
    settled = testing.settled_statistics(store, baseline)
    assert (settled.live_objects, settled.in_use) == (baseline.live_objects, baseline.in_use)
    assert not raw._deferred


def test_store_full_put_waits_then_raises():
    with shmpool.ObjectStore(1 << 20, space_timeout=0.2) as store:
        held = [store.put(np.ones(100_000)) for _ in range(1)]
        started = time.monotonic()
        with pytest.raises(shmpool.StoreFullError, match="within 0.2s"):
            store.put(np.ones(100_000))
        assert 0.2 <= time.monotonic() - started < 5
        del held


def test_store_full_message_falls_back_in_band_with_warning():
    with shmpool.ObjectStore(1 << 20, threshold=1024, space_timeout=0.1) as store:
        held = store.put(np.ones(100_000))
        value = np.arange(100_000, dtype=np.float64)
        with pytest.warns(shmpool.StoreFullWarning, match="in-band"):
            message = store.encode(value)
        assert message[:1] == b"I"
        assert np.array_equal(store.decode(message), value)
        assert store.statistics().fallbacks == 1
        del held


def test_encode_small_stays_in_band_and_big_goes_through_store(store):
    small = store.encode(np.zeros(10))
    assert small[:1] == b"I"
    big = store.encode(np.zeros(1 << 20))
    assert big[:1] == b"R" and len(big) < 32
    assert store.decode(big).shape == (1 << 20,)
    undelivered = store.encode(np.zeros(1 << 20))
    live = store.statistics().live_objects
    store.discard(undelivered)
    assert store.statistics().live_objects == live - 1


def test_an_interrupt_inside_a_store_section_is_repaired_by_the_next_locker():
    with RawStore(1 << 20) as store:
        ref = store.create(1000).seal()
        before = store.statistics().repairs
        with pytest.raises(KeyboardInterrupt):
            with store._locked():
                raise KeyboardInterrupt          # as if Ctrl-C cut a change
        assert store.statistics().repairs == before + 1
        assert bytes(store.get(ref)[:4]) == bytes(4)
        testing.check_invariants(store)


def test_a_validation_error_ends_a_store_section_clean():
    with RawStore(1 << 20) as store:
        ref = store.create(1000).seal()
        store.release(ref)
        before = store.statistics().repairs
        with pytest.raises(shmpool.ObjectNotFoundError):
            store.get(ref)                        # stale: refused before any write
        assert store.statistics().repairs == before


def test_a_wrong_argument_type_ends_a_store_section_clean():
    with RawStore(1 << 20) as store:
        before = store.statistics().repairs
        with pytest.raises(TypeError, match="expected an ObjectRef"):
            store.get("not a ref")
        with pytest.raises(TypeError):
            store.contains(42)
        assert store.statistics().repairs == before
