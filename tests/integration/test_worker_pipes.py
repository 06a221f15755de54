"""The Pool's worker sockets under process failures: answers of workers that
die together, a stopped worker, and workers whose parent is SIGKILLed.

Every step waits on an event, a queue or a process descriptor with a
deadline; nothing sleeps to let something happen.
"""

import json
import multiprocessing
import os
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

from conftest import DEADLOCK_TIMEOUT, START_METHODS

MiB = 1 << 20
EXIT_BOUND = 2.0          #: seconds a worker may outlive its killed parent

# -- task functions and worker state (module level, for spawn) ---------------

_gates = _reports = None


def set_gates(gates, reports):
    global _gates, _reports
    _gates, _reports = gates, reports


def after_gate(name, nbytes):
    """Wait for gate *name*, then return *nbytes* bytes of a known array."""
    if not _gates[name].wait(DEADLOCK_TIMEOUT):
        raise TimeoutError(f"the test never opened gate {name}")
    _reports.send(("returning", name, os.getpid()))
    return np.arange(nbytes // 8, dtype=np.float64)


def report_then_block():
    """Say that this worker runs its next task (so it has sent the answer
    before), then never return."""
    _reports.send(("blocked", None, os.getpid()))
    threading.Event().wait()


def square(x):
    return x * x


def _report(reports, kind, name=None):
    """The pid in the next report of *kind* (about gate *name*, if given)."""
    while True:
        assert reports.poll(DEADLOCK_TIMEOUT), f"no worker reported {kind!r}"
        got, about, pid = reports.recv()
        if got == kind and name in (None, about):
            return pid


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait up to *timeout* seconds for process *pid* to exit (any parent)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


class _Stall:
    """A result callback that holds the supervisor thread until released."""

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, _value):
        self.entered.set()
        self.release.wait(DEADLOCK_TIMEOUT)

    def wait_entered(self):
        assert self.entered.wait(DEADLOCK_TIMEOUT), "the callback never ran"


@pytest.fixture
def gated_pool(mp_context):
    """``(pool, gates, reports)``: a shmpool Pool whose workers know the
    gates ``a``, ``b``, ``c`` and put reports on a queue."""
    gates = {name: mp_context.Event() for name in "abc"}
    # A pipe, not a Queue: a worker killed just after its report must not
    # leave a lock held (one small write is atomic: no lock needed).
    reports, report_end = mp_context.Pipe(duplex=False)

    def make(processes, **kwargs):
        return shmpool.Pool(processes, context=mp_context, initializer=set_gates,
                            initargs=(gates, report_end), **kwargs)
    try:
        yield make, gates, reports
    finally:
        for gate in gates.values():
            gate.set()
        reports.close()
        report_end.close()


# -- two workers die together --------------------------------------------------

@pytest.mark.crash
def test_answers_of_two_workers_killed_together_are_all_delivered(gated_pool):
    """Worker A sends its answer and dies; while the supervisor handles that
    answer (its callback holds the supervisor thread), worker B sends its
    answer, a 1 MiB array that only B holds in the store, and dies too.
    B's answer must be read before the store reaps dead processes, which
    frees the holds of both at once."""
    make, gates, reports = gated_pool
    first, second = _Stall(), _Stall()
    with make(3) as pool:
        # Tasks go to idle workers in order (A, B, C), then one more into
        # each busy worker's socket in the same order (A, B).
        a = pool.apply_async(after_gate, ("a", 8), callback=second)
        b = pool.apply_async(after_gate, ("b", MiB))
        pool.apply_async(after_gate, ("c", 8), callback=first)
        pool.apply_async(report_then_block)
        pool.apply_async(report_then_block)
        gates["c"].set()
        first.wait_entered()                   # the supervisor reads nothing now
        gates["a"].set()
        pid_a = _report(reports, "blocked")  # A has sent its answer
        os.kill(pid_a, signal.SIGKILL)
        assert _wait_exited(pid_a, DEADLOCK_TIMEOUT)
        first.release.set()
        second.wait_entered()                  # A's answer is being handled
        gates["b"].set()
        pid_b = _report(reports, "blocked")  # B has sent its answer
        os.kill(pid_b, signal.SIGKILL)
        assert _wait_exited(pid_b, DEADLOCK_TIMEOUT)
        second.release.set()
        assert np.array_equal(a.get(DEADLOCK_TIMEOUT), np.arange(1.0))
        assert np.array_equal(b.get(DEADLOCK_TIMEOUT), np.arange(MiB // 8, dtype=np.float64))
        assert pool.map(square, range(6)) == [x * x for x in range(6)]


# -- a stopped worker ----------------------------------------------------------

def _wait_sleeping(pid: int, timeout: float) -> None:
    """Wait until *pid* sleeps in the kernel (polling /proc: no event says so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"S":
                return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never blocked")


@pytest.mark.crash
def test_a_worker_stopped_halfway_through_a_send_does_not_stop_the_others(gated_pool):
    """A 1 MiB in-band answer (threshold raised) does not fit the socket:
    its worker is SIGSTOPped with part of it sent.  Tasks on the other
    worker still complete; after SIGCONT everything does."""
    make, gates, reports = gated_pool
    stall = _Stall()
    with make(2, threshold=8 * MiB) as pool:
        big = pool.apply_async(after_gate, ("a", MiB))             # worker A
        pool.apply_async(after_gate, ("c", 8), callback=stall)   # worker B
        gates["c"].set()
        stall.wait_entered()                   # nothing is read from A now
        gates["a"].set()
        pid_a = _report(reports, "returning", "a")
        _wait_sleeping(pid_a, DEADLOCK_TIMEOUT)  # blocked: the socket is full
        os.kill(pid_a, signal.SIGSTOP)
        try:
            stall.release.set()
            done, lock, most_done = [], threading.Lock(), threading.Event()

            def count(_):
                with lock:
                    done.append(1)
                    if len(done) == 9:
                        most_done.set()
            results = [pool.apply_async(square, (x,), callback=count) for x in range(10)]
            # At most one task waits in A's socket; the others run on B.
            assert most_done.wait(DEADLOCK_TIMEOUT), f"only {len(done)} of 10 tasks finished"
        finally:
            os.kill(pid_a, signal.SIGCONT)
        assert [r.get(DEADLOCK_TIMEOUT) for r in results] == [x * x for x in range(10)]
        assert np.array_equal(big.get(DEADLOCK_TIMEOUT), np.arange(MiB // 8, dtype=np.float64))


# -- the parent is SIGKILLed ---------------------------------------------------

PARENT = textwrap.dedent("""
    import json, os, sys, threading
    import multiprocessing
    import shmpool
    from test_worker_pipes import parent_scenario

    if __name__ == "__main__":
        method, moment, creator = sys.argv[1:4]
        ctx = multiprocessing.get_context(method)
        def run():
            parent_scenario(ctx, moment, lambda pids: (print(json.dumps(pids), flush=True)))
        if creator == "main":
            run()
        else:                   # no PR_SET_PDEATHSIG: the waits alone must see it
            thread = threading.Thread(target=run)
            thread.start()
            thread.join()
""")


def short_task(i):
    time.sleep(0.02)                    # the work of the task, not a wait
    return i


def parent_scenario(ctx, moment, report):
    """Run in the parent process that the test SIGKILLs: bring the workers
    to *moment*, report their pids, and wait to be killed."""
    gates, (reports, report_end) = {"a": ctx.Event()}, ctx.Pipe(duplex=False)
    pool = shmpool.Pool(3 if moment == "send" else 2, context=ctx, threshold=8 * MiB,
                        initializer=set_gates, initargs=(gates, report_end))
    pool.map(_pid, range(8), chunksize=1)
    pids = list(pool.statistics().worker_pids)
    if moment == "map":                  # workers run a long map
        it = pool.imap_unordered(short_task, range(100_000))
        next(it)
    elif moment == "send":               # two workers block sending 1 MiB answers
        stall = _Stall()
        for _ in range(2):               # in-band: the threshold is raised
            pool.apply_async(after_gate, ("a", MiB))
        pool.apply_async(_pid, (0,), callback=stall)
        stall.wait_entered()             # nobody reads the sockets any more
        gates["a"].set()
        for _ in range(2):
            _wait_sleeping(_report(reports, "returning", "a"), DEADLOCK_TIMEOUT)
    report(pids)                         # "receive": idle workers wait for a task
    threading.Event().wait()


def _pid(_):
    return os.getpid()


@pytest.mark.crash
@pytest.mark.parametrize("creator", ["main", "thread"],
                         ids=["made-in-main-thread", "made-in-other-thread"])
@pytest.mark.parametrize("moment", ["map", "send", "receive"])
@pytest.mark.parametrize("method", START_METHODS)
def test_workers_exit_when_the_parent_is_sigkilled(method, moment, creator):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [here, os.path.dirname(here), os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, method, moment, creator],
                              stdout=subprocess.PIPE, env=env)
    try:
        ready = select.select([parent.stdout], [], [], DEADLOCK_TIMEOUT)[0]
        assert ready, "the parent never reported its workers"
        pids = json.loads(parent.stdout.readline())
        assert len(pids) >= 2
        descriptors = [os.pidfd_open(pid) for pid in pids]
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    try:
        deadline = time.monotonic() + EXIT_BOUND
        survivors = []
        for pid, fd in zip(pids, descriptors):
            left = max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                survivors.append(pid)
                os.kill(pid, signal.SIGKILL)     # do not leave it behind
        assert not survivors, f"workers {survivors} outlived their killed parent by {EXIT_BOUND}s"
    finally:
        for fd in descriptors:
            os.close(fd)
