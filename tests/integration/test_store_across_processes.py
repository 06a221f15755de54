"""Zero copy and lifetime of store objects between processes (every start method)."""

import gc
import pickle

import numpy as np
import pytest

import shmpool
from shmpool import testing

from conftest import DEADLOCK_TIMEOUT

MiB = 1 << 20


def _expected(n: int) -> np.ndarray:
    return np.random.default_rng(n).random(n)


# -- children (module level, for spawn) ------------------------------------

def _child_encodes(store, nbytes, out):
    arr = np.arange(nbytes // 8, dtype=np.float64)
    out.put(store.encode(arr))        # the message holds the object, not the child


def _child_reads(store, message, out):
    got = store.decode(message)
    out.put((bool(testing.in_store(store, got)), bool(got.flags.writeable),
             float(got[0]), float(got[-1]), got.nbytes))


def _child_holds_derived_views(store, message, n, ready, reused, out):
    got = store.decode(message)
    views = [got[::3], got.reshape(-1, 2)[:, 1], np.asarray(memoryview(got))[5:],
             got[100:200].view(np.uint8)]
    del got
    gc.collect()
    ready.set()
    if not reused.wait(DEADLOCK_TIMEOUT):
        out.put("parent never reused the space")
        return
    want = _expected(n)
    intact = (np.array_equal(views[0], want[::3])
              and np.array_equal(views[1], want.reshape(-1, 2)[:, 1])
              and np.array_equal(views[2], want[5:])
              and np.array_equal(views[3], want[100:200].view(np.uint8)))
    out.put("intact" if intact else "views changed under their reader")
    del views


# -- tests -------------------------------------------------------------------

@pytest.mark.parametrize("nbytes", [256 * MiB])
def test_array_put_in_child_is_read_zero_copy_in_parent(mp_context, nbytes):
    with shmpool.ObjectStore(nbytes + 64 * MiB) as store:
        out = mp_context.Queue()
        child = mp_context.Process(target=_child_encodes, args=(store, nbytes, out))
        child.start()
        message = out.get(timeout=DEADLOCK_TIMEOUT)
        child.join(DEADLOCK_TIMEOUT)
        assert child.exitcode == 0
        assert len(message) < 1024                     # 256 MiB crossed as a ref
        got = store.decode(message)
        assert got.nbytes == nbytes
        assert testing.in_store(store, got)
        assert got[0] == 0.0 and got[-1] == nbytes // 8 - 1
        ref = store.put(got)                           # untouched: referenced
        assert len(pickle.dumps(ref)) < 1024
        got[0] = 1.0                                   # copy-on-write: this page only
        assert store.get(ref)[0] == 0.0


@pytest.mark.parametrize("readonly", [False, True], ids=["cow", "readonly"])
def test_array_put_in_parent_is_read_zero_copy_in_child(mp_context, readonly):
    with shmpool.ObjectStore(128 * MiB, readonly=readonly) as store:
        arr = np.arange(8 * MiB // 8, dtype=np.float64)
        out = mp_context.Queue()
        child = mp_context.Process(target=_child_reads, args=(store, store.encode(arr), out))
        child.start()
        in_arena, writable, first, last, nbytes = out.get(timeout=DEADLOCK_TIMEOUT)
        child.join(DEADLOCK_TIMEOUT)
        assert in_arena and writable != readonly
        assert (first, last, nbytes) == (0.0, arr[-1], arr.nbytes)


def test_derived_views_survive_release_and_reuse_across_processes(mp_context):
    with shmpool.ObjectStore(64 * MiB) as store:
        baseline = store.statistics()
        n = 1 << 20
        message = store.encode(_expected(n))
        ready, reused, out = mp_context.Event(), mp_context.Event(), mp_context.Queue()
        child = mp_context.Process(target=_child_holds_derived_views,
                                   args=(store, message, n, ready, reused, out))
        child.start()
        assert ready.wait(DEADLOCK_TIMEOUT)
        # The parent holds nothing of the object now; only the child's views
        # do.  Churn the store so any freed block would be overwritten.
        for i in range(20):
            junk = store.put(np.full(n // 4, float(i)))
            store.release(junk)
        reused.set()
        assert out.get(timeout=DEADLOCK_TIMEOUT) == "intact"
        child.join(DEADLOCK_TIMEOUT)
        assert child.exitcode == 0
        after = store.statistics()
        assert (after.live_objects, after.in_use) == (baseline.live_objects, baseline.in_use)
        testing.check_invariants(store)


def test_derived_views_survive_in_one_process(store):
    baseline = store.statistics()
    n = 1 << 18
    ref = store.put(_expected(n))
    got = store.get(ref)
    views = [got[::3], got.reshape(-1, 4).T, np.asarray(memoryview(got))[7:],
             memoryview(got)[1:9]]
    del got
    store.release(ref)
    del ref
    gc.collect()
    for i in range(20):                             # reuse every freed block
        store.release(store.put(np.full(n // 2, float(-i))))
    want = _expected(n)
    assert np.array_equal(views[0], want[::3])
    assert np.array_equal(views[1], want.reshape(-1, 4).T)
    assert np.array_equal(views[2], want[7:])
    assert views[3].tolist() == want[1:9].tolist()
    del views
    after = store.statistics()
    assert (after.live_objects, after.in_use) == (baseline.live_objects, baseline.in_use)
