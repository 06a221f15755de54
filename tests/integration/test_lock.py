"""The arena lock across processes: stalls, signals, other users, fork hooks.

The lock is a robust pthread mutex in the arena (see ``shmpool._allocator``):
the kernel, never a timer or a pid, decides that a holder is dead.  These
tests stop holders, fire signals at waiters and holders, and run a store as
another user next to names that look like shmpool's.
"""

import os
import pwd
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import shmpool
from shmpool import testing
from shmpool._allocator import FreeListAllocator
from shmpool._arena import Arena

from conftest import DEADLOCK_TIMEOUT, START_METHODS

#: How long the holder stays stopped (the issue's case: longer than the 5 s
#: after which the old lock robbed a holder).
STOP_SECONDS = 10
#: Seconds of put/get or allocate/free under a 1 ms SIGALRM.
ALARM_SECONDS = 2.0
#: Rounds of "a signal handler raises at a random moment".
INTERRUPT_ROUNDS = 300
#: After its holder dies, the lock is taken within this long.
RECOVERY_BOUND = 1.0

SHMPOOL_PARENT = os.path.dirname(os.path.dirname(shmpool.__file__))


@pytest.fixture
def arena():
    """An 8 MiB arena, closed after the test."""
    made = Arena.create(8 << 20)
    try:
        yield made
    finally:
        made.close()


def _subprocess_env() -> dict:
    """Environment for a child interpreter that imports this shmpool."""
    return {**os.environ, "PYTHONPATH": SHMPOOL_PARENT}


def _wait_until_stopped(pid: int) -> None:
    deadline = time.monotonic() + DEADLOCK_TIMEOUT
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"T":
                return
        time.sleep(0.001)        # polling another process's state; no event exists
    raise AssertionError(f"process {pid} did not stop")


# -- a stopped holder is waited for, never robbed -------------------------------

def _hold_then_stop(arena, conn, where):
    """Take the lock, say so, and SIGSTOP this process: inside the section,
    or inside unlock() between clearing the dirty word and the release."""
    alloc = FreeListAllocator(arena)
    if where == "section":
        alloc.lock()
        conn.send("holding")
        os.kill(os.getpid(), signal.SIGSTOP)
        off = alloc.allocate_locked(1000)        # still ours after SIGCONT
        alloc.free_locked(off)
        alloc.unlock()
    else:
        release = arena.mutex.release

        def stopping_release():
            conn.send("holding")
            os.kill(os.getpid(), signal.SIGSTOP)
            return release()

        arena.mutex.release = stopping_release
        alloc.lock()
        alloc.unlock()
    conn.send("released")


def _take_lock_and_report(arena, conn):
    alloc = FreeListAllocator(arena)
    conn.send("waiting")
    try:
        with alloc.locked():
            conn.send(time.monotonic())
            alloc._check_invariants()
    except BaseException as exc:
        conn.send(repr(exc))


@pytest.mark.crash
@pytest.mark.timeout(180)
@pytest.mark.parametrize("method, where", [
    *((m, "section") for m in START_METHODS),
    ("fork", "unlock"),
])
def test_a_stopped_holder_is_waited_for_never_robbed(method, where):
    import multiprocessing
    ctx = multiprocessing.get_context(method)
    arena = Arena.create(4 << 20)
    try:
        alloc = FreeListAllocator.format(arena)
        here, there = ctx.Pipe()
        holder = ctx.Process(target=_hold_then_stop, args=(arena, there, where))
        holder.start()
        assert here.poll(DEADLOCK_TIMEOUT) and here.recv() == "holding"
        _wait_until_stopped(holder.pid)
        waiter_here, waiter_there = ctx.Pipe()
        waiter = ctx.Process(target=_take_lock_and_report, args=(arena, waiter_there))
        waiter.start()
        assert waiter_here.poll(DEADLOCK_TIMEOUT) and waiter_here.recv() == "waiting"
        in_thread = []
        thread = threading.Thread(target=lambda: in_thread.append(_locked_at(alloc)))
        thread.start()
        # The stall: for STOP_SECONDS nobody gets the lock, nobody gives up.
        assert not waiter_here.poll(STOP_SECONDS), waiter_here.recv()
        assert thread.is_alive() and not in_thread
        assert alloc.statistics().repairs == 0
        resumed = time.monotonic()
        os.kill(holder.pid, signal.SIGCONT)
        assert here.poll(DEADLOCK_TIMEOUT) and here.recv() == "released"
        assert waiter_here.poll(DEADLOCK_TIMEOUT)
        got = waiter_here.recv()
        thread.join(DEADLOCK_TIMEOUT)
        assert isinstance(got, float) and got >= resumed, got
        assert isinstance(in_thread[0], float) and in_thread[0] >= resumed, in_thread
        for process in (holder, waiter):
            process.join(DEADLOCK_TIMEOUT)
            assert process.exitcode == 0
        stats = alloc.statistics()
        assert (stats.lock_takeovers, stats.repairs) == (0, 0)
        with alloc.locked():
            alloc._check_invariants()
    finally:
        arena.close()


def _locked_at(alloc):
    try:
        with alloc.locked():
            return time.monotonic()
    except BaseException as exc:
        return exc


# -- a dead holder: the kernel says so, whatever its pid now names ---------------

def _lock_and_die(arena):
    FreeListAllocator(arena).lock()
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.crash
@pytest.mark.timeout(60)
def test_a_dead_holder_whose_pid_names_a_live_process_is_replaced_at_once(mp_context):
    arena = Arena.create(4 << 20)
    try:
        alloc = FreeListAllocator.format(arena)
        victim = mp_context.Process(target=_lock_and_die, args=(arena,))
        victim.start()
        victim.join(DEADLOCK_TIMEOUT)
        assert victim.exitcode == -signal.SIGKILL
        # As if its pid had been reused: the dirty word now names a live
        # process.  Nothing reads it to decide anything.
        from shmpool._allocator import _H_DIRTY
        arena.words[_H_DIRTY >> 3] = os.getpid()
        started = time.monotonic()
        with alloc.locked():
            alloc._check_invariants()
        assert time.monotonic() - started < RECOVERY_BOUND
        stats = alloc.statistics()
        assert (stats.lock_takeovers, stats.repairs) == (1, 1)
    finally:
        arena.close()


# -- signals: a 1 ms SIGALRM changes nothing; a raising handler leaks nothing ----

def _allocate_free_until(arena, stop, ready):
    alloc = FreeListAllocator(arena)
    ready.set()
    while not stop.is_set():
        alloc.free(alloc.try_allocate(2000))


def _put_get_until(store, stop, ready):
    ready.set()
    while not stop.is_set():
        ref = store.put(np.ones(500))
        view = store.get(ref)
        store.release(ref)
        del view


class _Contender:
    """Another process taking the lock in a loop until stopped; a context
    manager that kills it if the test fails first."""

    def __init__(self, ctx, target, shared):
        self.stop, ready = ctx.Event(), ctx.Event()
        self.process = ctx.Process(target=target, args=(shared, self.stop, ready))
        self.process.start()
        assert ready.wait(DEADLOCK_TIMEOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(DEADLOCK_TIMEOUT)

    def finish(self):
        """Stop it; it must get the lock once more to leave, so this also
        proves nobody left the lock held."""
        self.stop.set()
        self.process.join(DEADLOCK_TIMEOUT)
        assert self.process.exitcode == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layer", ["allocator", "store"])
def test_a_sigalrm_every_millisecond_changes_nothing(mp_context, layer):
    ticks = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: ticks.append(1))
    rng = random.Random(5)
    if layer == "allocator":
        arena = Arena.create(8 << 20)
        alloc = FreeListAllocator.format(arena)
        shared, target = arena, _allocate_free_until
    else:
        store = shmpool.ObjectStore(32 << 20)
        alloc = testing.raw_store(store)._alloc
        shared, target = store, _put_get_until
    try:
        with _Contender(mp_context, target, shared) as contender:
            _run_under_alarms(layer, alloc, store if layer == "store" else None, rng)
            contender.finish()
        assert len(ticks) > 100
        with alloc.locked():
            alloc._check_invariants()
        stats = alloc.statistics()
        assert (stats.lock_takeovers, stats.repairs) == (0, 0)
        if layer == "store":
            testing.check_invariants(store)
    finally:
        signal.signal(signal.SIGALRM, previous)
        (arena if layer == "allocator" else store).close()


def _run_under_alarms(layer, alloc, store, rng):
    """ALARM_SECONDS of allocate/free or put/get under a 1 ms SIGALRM."""
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        deadline = time.monotonic() + ALARM_SECONDS
        while time.monotonic() < deadline:
            if layer == "allocator":
                alloc.free(alloc.try_allocate(rng.randrange(0, 20_000)))
            else:
                arr = np.full(rng.randrange(1, 5_000), 2.0)
                ref = store.put(arr)
                assert (store.get(ref) == arr).all()
                store.release(ref)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)


class _Interrupt(BaseException):
    """What the test's signal handler raises (as KeyboardInterrupt would)."""


def _raise_interrupt(signum, frame):
    raise _Interrupt


def _interrupt_rounds(arena, hot_loop, after_round):
    """With another process contending for the lock: INTERRUPT_ROUNDS times,
    run *hot_loop* until a signal handler raises at a random moment, then
    call *after_round*.  Then the contender must leave (it needs the lock to)
    and another thread must find every invariant holding."""
    import multiprocessing
    alloc = FreeListAllocator(arena)
    rng = random.Random(11)
    with _Contender(multiprocessing.get_context("fork"), _allocate_free_until,
                    arena) as contender:
        previous = signal.signal(signal.SIGALRM, _raise_interrupt)
        try:
            for _ in range(INTERRUPT_ROUNDS):
                try:
                    signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-5, 5e-4))
                    while True:
                        hot_loop(rng)
                except _Interrupt:
                    pass
                after_round()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, previous)
        contender.finish()
    result = []
    thread = threading.Thread(target=lambda: result.append(_check_in_lock(alloc)))
    thread.start()
    thread.join(DEADLOCK_TIMEOUT)
    assert result == [None], result


@pytest.mark.skipif(sys.version_info < (3, 11), reason=(
    "before 3.11 the interpreter also runs signal handlers between lock() "
    "returning and the caller's try (the residual stated in _allocator)"))
@pytest.mark.timeout(180)
def test_an_interrupt_in_allocate_or_free_never_leaves_the_lock_held(arena):
    alloc = FreeListAllocator.format(arena)

    def hot_loop(rng):
        alloc.free(alloc.try_allocate(rng.randrange(0, 5000)))

    def after_round():
        assert arena.mutex.owner_tid() != threading.get_native_id(), \
            "the interrupted thread kept the lock"

    _interrupt_rounds(arena, hot_loop, after_round)
    # Interrupts did land inside sections, and each was repaired.
    stats = alloc.statistics()
    assert stats.repairs >= 1 and stats.lock_takeovers == 0


@pytest.mark.timeout(180)
def test_an_interrupt_that_escapes_a_section_is_healed_by_the_next_lock(arena):
    # ``with allocator.locked():`` can lose an interrupt at the entry of
    # __exit__, after the body and before the release: the lock stays with
    # this thread, dirty, until this thread's next lock() repairs and goes on.
    alloc = FreeListAllocator.format(arena)
    kept = []

    def hot_loop(rng):
        with alloc.locked():
            alloc.free_locked(alloc.allocate_locked(rng.randrange(0, 5000)))

    def after_round():
        me = threading.get_native_id()
        kept.append(arena.mutex.owner_tid() == me)
        with alloc.locked():
            pass
        assert arena.mutex.owner_tid() != me

    _interrupt_rounds(arena, hot_loop, after_round)
    stats = alloc.statistics()
    assert stats.repairs >= sum(kept) and stats.lock_takeovers == 0
    print(f"{sum(kept)} of {INTERRUPT_ROUNDS} interrupts left the lock held until "
          f"the next lock(); {stats.repairs} repairs")


def _check_in_lock(alloc):
    try:
        with alloc.locked():
            alloc._check_invariants()
    except BaseException as exc:
        return exc


# -- fork hooks may hold the lock across fork -----------------------------------

FORK_HOOKS = textwrap.dedent("""
    import os
    from shmpool._allocator import FreeListAllocator
    from shmpool._arena import Arena

    arena = Arena.create(4 << 20)
    alloc = FreeListAllocator.format(arena)
    os.register_at_fork(before=alloc.lock, after_in_parent=alloc.unlock)
    kept = alloc.try_allocate(100)
    for _ in range(20):
        pid = os.fork()
        if pid == 0:               # waits for the parent's after_in_parent
            alloc.free(alloc.try_allocate(1000))
            os._exit(0)
        alloc.free(alloc.try_allocate(500))
        assert os.waitpid(pid, 0)[1] == 0
    with alloc.locked():
        alloc._check_invariants()
    stats = alloc.statistics()
    assert (stats.live_blocks, stats.lock_takeovers, stats.repairs) == (1, 0, 0), stats
    print("ok")
""")


@pytest.mark.timeout(120)
def test_a_before_fork_hook_can_hold_the_lock_across_fork():
    # A subprocess: fork hooks cannot be unregistered.
    proc = subprocess.run([sys.executable, "-c", FORK_HOOKS], capture_output=True, text=True,
                          timeout=DEADLOCK_TIMEOUT, env=_subprocess_env())
    assert proc.stdout.strip() == "ok", proc.stderr


# -- another user's names in /dev/shm ----------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait(DEADLOCK_TIMEOUT)
    return proc.pid


def _as_nobody_use_a_store(conn_fd: int) -> None:
    """In a forked child: become nobody, use a store, report, exit."""
    status = 1
    try:
        nobody = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        with shmpool.ObjectStore(16 << 20) as store:
            for n in (10, 100_000):
                ref = store.put(np.arange(n))
                assert (store.get(ref) == np.arange(n)).all()
                store.release(ref)
        q = shmpool.Queue()
        q.put(np.ones(1 << 20))
        assert q.get(timeout=DEADLOCK_TIMEOUT).sum() == 1 << 20
        q.close()
        q.join_thread()
        os.write(conn_fd, f"ok {os.getuid()}".encode())
        status = 0
    except BaseException as exc:
        os.write(conn_fd, repr(exc).encode()[:4000])
    finally:
        os._exit(status)


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create names as one user "
                                              "and run a store as another (nobody)")
def test_a_store_of_one_user_ignores_and_keeps_another_users_names():
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to run the store as")
    # Root's names, looking like a dead owner's semaphore and a live owner's
    # segment: the start-up of earlier versions choked on the first.
    token = os.urandom(8).hex()
    paths = [f"/dev/shm/sem.shmp_{_dead_pid()}_{token}", f"/dev/shm/shmp_{os.getpid()}_{token}"]
    for path in paths:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.write(fd, b"x" * 32)
        os.close(fd)
    try:
        before = {path: os.stat(path) for path in paths}
        # Load everything the child needs first: as nobody it may not read
        # the interpreter's files.
        Arena.create(1 << 20).close()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _as_nobody_use_a_store(write_end)
        os.close(write_end)
        try:
            if not select.select([read_end], [], [], DEADLOCK_TIMEOUT)[0]:
                os.kill(pid, signal.SIGKILL)
            report = os.read(read_end, 4096).decode()
            _, status = os.waitpid(pid, 0)
        finally:
            os.close(read_end)
        assert (os.waitstatus_to_exitcode(status), report) == (0, f"ok {nobody.pw_uid}")
        for path, st in before.items():
            now = os.stat(path)
            assert (now.st_ino, now.st_uid, now.st_mtime_ns) == (st.st_ino, st.st_uid,
                                                                 st.st_mtime_ns), path
    finally:
        for path in paths:
            os.unlink(path)
