"""The store's lifetime rules across processes (issue 10, cases 1, 2, 3 and 6).

Each test is a case that went wrong before the rules existed: a fork child
aborting its parent's unsealed object, a fork child reading an object freed
and reused under it, a closed store freeing what its views still show, and
a deleted object taking another object's data with it.
"""

import gc
import hashlib
import multiprocessing
import os
import signal

import numpy as np
import pytest

import shmpool
from shmpool import testing

from conftest import DEADLOCK_TIMEOUT

MiB = 1 << 20


def _digest(buf) -> str:
    return hashlib.sha256(memoryview(buf).cast("B")).hexdigest()


def _noop():
    pass


def _fork_context():
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("fork is not available")
    return multiprocessing.get_context("fork")


# -- case 1: only the creator aborts an unsealed object -----------------------

def test_fork_child_does_not_abort_parents_unsealed_object():
    ctx = _fork_context()
    with shmpool.ObjectStore(16 * MiB) as store:
        out = store.empty(1000)
        out[:] = np.arange(1000)
        child = ctx.Process(target=_noop)
        child.start()
        child.join(DEADLOCK_TIMEOUT)
        assert child.exitcode == 0
        ref = store.put(out)              # the child's exit must not have aborted it
        assert np.array_equal(store.get(ref), np.arange(1000))
        testing.check_invariants(store)


def _close_inherited_store(store):
    store.close()


def test_fork_child_closing_the_store_does_not_abort_parents_unsealed_object():
    ctx = _fork_context()
    with shmpool.ObjectStore(16 * MiB) as store:
        out = store.empty(1000)
        out[:] = 7.0
        child = ctx.Process(target=_close_inherited_store, args=(store,))
        child.start()
        child.join(DEADLOCK_TIMEOUT)
        assert child.exitcode == 0
        assert (store.get(store.put(out)) == 7.0).all()


def _add_one(arr):
    return float(arr[0]) + 1.0


def test_pool_with_maxtasksperchild_under_fork_never_loses_an_argument():
    ctx = _fork_context()
    arg = np.zeros(MiB)                               # 8 MiB
    with shmpool.Pool(2, maxtasksperchild=1, context=ctx) as pool:
        results = [pool.apply_async(_add_one, (arg,)) for _ in range(120)]
        assert [r.get(DEADLOCK_TIMEOUT) for r in results] == [1.0] * 120


# -- case 2: a fork child's inherited views hold their objects from the fork --

def _check_inherited_view(view, want, go, out):
    if not go.wait(DEADLOCK_TIMEOUT):
        out.put("parent never churned")
        return
    out.put("intact" if _digest(view) == want else "changed under its reader")


def test_fork_child_inherited_view_survives_parent_dropping_it_at_start():
    ctx = _fork_context()
    with shmpool.ObjectStore(64 * MiB) as store:
        baseline = store.statistics()
        outcomes = []
        for trial in range(12):
            ref = store.put(np.random.default_rng(trial).random(MiB // 8))
            view = store.get(ref)
            store.release(ref)
            del ref
            go, out = ctx.Event(), ctx.Queue()
            child = ctx.Process(target=_check_inherited_view,
                                args=(view, _digest(view), go, out))
            child.start()
            del view                      # the parent lets go at once
            gc.collect()
            for i in range(8):            # reuse whatever was freed
                store.release(store.put(np.full(MiB // 8, float(i))))
            go.set()
            outcomes.append(out.get(timeout=DEADLOCK_TIMEOUT))
            child.join(DEADLOCK_TIMEOUT)
        assert outcomes == ["intact"] * len(outcomes)
        settled = testing.settled_statistics(store, baseline)
        assert (settled.live_objects, settled.in_use) == (baseline.live_objects, baseline.in_use)


def _sleep_forever(view, ready):
    ready.set()
    signal.pause()


def test_fork_child_killed_at_once_leaves_nothing_held():
    ctx = _fork_context()
    with shmpool.ObjectStore(64 * MiB) as store:
        baseline = store.statistics()
        view = store.get(store.put(np.ones(MiB)))
        ready = ctx.Event()
        child = ctx.Process(target=_sleep_forever, args=(view, ready))
        child.start()
        del view
        gc.collect()
        assert ready.wait(DEADLOCK_TIMEOUT)
        assert store.statistics().live_objects == baseline.live_objects + 1   # the child's
        os.kill(child.pid, signal.SIGKILL)
        child.join(DEADLOCK_TIMEOUT)
        assert store.raw.reap_dead_processes() == 1
        after = store.statistics()
        assert (after.live_objects, after.in_use) == (baseline.live_objects, baseline.in_use)
        testing.check_invariants(store)


# -- case 3: close() keeps what live views show --------------------------------

def _produce(q, first_sent, consumer_closed, done, n):
    q.put(np.zeros(n))
    first_sent.set()
    if not consumer_closed.wait(DEADLOCK_TIMEOUT):
        return
    for _ in range(8):                    # reuse any block the consumer let go
        q.put(np.full(n, 2.0))
        q.get()
    done.set()


@pytest.mark.parametrize("how", ["close", "drop"])
def test_queue_closed_or_dropped_by_consumer_keeps_its_array(mp_context, how):
    n = MiB // 8
    q = shmpool.Queue(ctx=mp_context, capacity=16 * MiB)
    first_sent, consumer_closed, done = mp_context.Event(), mp_context.Event(), mp_context.Event()
    producer = mp_context.Process(target=_produce, args=(q, first_sent, consumer_closed, done, n))
    producer.start()
    assert first_sent.wait(DEADLOCK_TIMEOUT)
    got = q.get(timeout=DEADLOCK_TIMEOUT)
    assert testing.in_store(testing.queue_store(q), got)
    if how == "close":
        q.close()
    else:
        del q
        gc.collect()
    consumer_closed.set()
    assert done.wait(DEADLOCK_TIMEOUT)
    assert (got == 0.0).all(), "the closed queue's store freed an array still in use"
    producer.join(DEADLOCK_TIMEOUT)
    assert producer.exitcode == 0
    del got


def test_closed_attachment_keeps_views_and_frees_them_with_the_last():
    with shmpool.ObjectStore(16 * MiB) as owner:
        baseline = owner.statistics()
        consumer = shmpool.ObjectStore.__new__(shmpool.ObjectStore)
        consumer._init(_reattach(owner), owner.threshold)
        ref = owner.put(np.zeros(MiB // 8))
        got = consumer.get(ref)
        owner.release(ref)
        consumer.close()
        for i in range(8):
            owner.release(owner.put(np.full(MiB // 8, 3.0)))
        assert (got == 0.0).all()
        assert owner.statistics().attached_processes == baseline.attached_processes + 1
        del got
        gc.collect()
        after = owner.statistics()
        assert (after.live_objects, after.in_use) == (baseline.live_objects, baseline.in_use)
        assert after.attached_processes == baseline.attached_processes
        testing.check_invariants(owner)


def _reattach(store):
    """A second attachment of *store*'s raw store in this process, as a
    process that received the store would have."""
    import pickle
    return pickle.loads(pickle.dumps(testing.raw_store(store)))


# -- case 6: delete never takes another object's data with it -------------------

def test_delete_of_a_referenced_object_keeps_the_referrer_readable(store):
    baseline = store.statistics()
    r1 = store.put(np.arange(MiB // 8, dtype=np.float64))
    view = store.get(r1)
    r2 = store.put({"inner": view})       # references r1's buffer, no copy
    del view
    store.delete(r1)
    with pytest.raises(shmpool.ObjectNotFoundError, match="deleted"):
        store.get(r1)
    got = store.get(r2)["inner"]
    assert np.array_equal(got, np.arange(MiB // 8, dtype=np.float64))
    del got, r2, r1
    gc.collect()
    after = store.statistics()
    assert (after.live_objects, after.in_use) == (baseline.live_objects, baseline.in_use)


def _read_referrer(store, message, out):
    try:
        out.put(float(store.decode(message)["inner"].sum()))
    except Exception as exc:
        out.put(repr(exc))


def test_delete_of_a_referenced_object_keeps_the_referrer_readable_elsewhere(mp_context):
    with shmpool.ObjectStore(32 * MiB) as store:
        r1 = store.put(np.ones(MiB // 8))
        view = store.get(r1)
        message = store.encode({"inner": view})
        del view
        store.delete(r1)
        out = mp_context.Queue()
        child = mp_context.Process(target=_read_referrer, args=(store, message, out))
        child.start()
        assert out.get(timeout=DEADLOCK_TIMEOUT) == MiB // 8
        child.join(DEADLOCK_TIMEOUT)
        assert child.exitcode == 0


def _put_inherited_unsealed(store, arr, out):
    try:
        got = store.get(store.put(arr))
        out.put(float(got.sum()))
    except Exception as exc:
        out.put(repr(exc))


def test_fork_child_puts_parents_unsealed_array_as_a_copy():
    ctx = _fork_context()
    with shmpool.ObjectStore(16 * MiB) as store:
        arr = store.empty(1000)
        arr[:] = 1.0
        out = ctx.Queue()
        child = ctx.Process(target=_put_inherited_unsealed, args=(store, arr, out))
        child.start()
        assert out.get(timeout=DEADLOCK_TIMEOUT) == 1000.0
        child.join(DEADLOCK_TIMEOUT)
        assert arr.flags.writeable            # still the parent's to seal
        arr[0] = 5.0
        assert store.get(store.put(arr))[0] == 5.0


def _report_inherited(view, want, go, out):
    out.put(go.wait(DEADLOCK_TIMEOUT) and _digest(view) == want)


def test_forks_from_two_threads_at_once_each_hold_what_they_inherit():
    import threading
    ctx = _fork_context()
    with shmpool.ObjectStore(32 * MiB) as store:
        baseline = store.statistics()
        view = store.get(store.put(np.random.default_rng(1).random(MiB // 8)))
        want = _digest(view)
        go, out = ctx.Event(), ctx.Queue()
        children = []

        def start_some():
            for _ in range(4):
                child = ctx.Process(target=_report_inherited, args=(view, want, go, out))
                child.start()
                children.append(child)

        threads = [threading.Thread(target=start_some) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        del view
        gc.collect()
        for i in range(4):
            store.release(store.put(np.full(MiB // 8, float(i))))
        go.set()
        assert [out.get(timeout=DEADLOCK_TIMEOUT) for _ in children] == [True] * len(children)
        for child in children:
            child.join(DEADLOCK_TIMEOUT)
        store.raw.reap_dead_processes()
        after = testing.settled_statistics(store, baseline)
        assert (after.live_objects, after.in_use) == (baseline.live_objects, baseline.in_use)
        assert after.attached_processes == baseline.attached_processes
        testing.check_invariants(store)


# -- liveness is the kernel's, not a pid's ---------------------------------------
#
# The children below reach into their own store to stand for what a pid check
# gets wrong: a live pid that no longer belongs to an attached process (pid
# reuse), and a pid that means nothing here (another PID namespace).

def _hold_then_drop_liveness(raw):
    os.close(raw._live_fd)                # as if this pid now were another process
    raw._live_fd = None


def _hold_under_foreign_pid(raw):
    raw._put64(raw._proc_at(raw._index), 2**31 - 1)    # a pid no process here has


def _hold_and_pretend(store, ref, pretend, ready, done):
    view = store.get(ref)
    pretend(store.raw)
    ready.set()
    done.wait(DEADLOCK_TIMEOUT)
    del view


def _reap_while_child_holds(store, pretend) -> int:
    """Start a fork child that holds *store*'s one object and then does
    *pretend*; return what a reap finds while the child is still alive."""
    ctx = _fork_context()
    ref = store.put(np.ones(1000))
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_and_pretend, args=(store, ref, pretend, ready, done))
    child.start()
    try:
        assert ready.wait(DEADLOCK_TIMEOUT)
        reaped = store.raw.reap_dead_processes()
        store.release(ref)
        return reaped
    finally:
        done.set()
        child.join(DEADLOCK_TIMEOUT)


def test_index_whose_lock_is_gone_is_reaped_though_its_pid_lives():
    with shmpool.ObjectStore(16 * MiB) as store:
        assert _reap_while_child_holds(store, _hold_then_drop_liveness) == 1
        assert store.statistics().live_objects == 0
        testing.check_invariants(store)


def test_live_process_with_a_foreign_pid_is_not_reaped():
    with shmpool.ObjectStore(16 * MiB) as store:
        assert _reap_while_child_holds(store, _hold_under_foreign_pid) == 0
        assert store.statistics().live_objects == 0      # the child let go at exit
        testing.check_invariants(store)
