"""The leak fixture's detector: a name nobody uses any more is a leak, a
name some live process uses is not, whoever made either."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

from shmpool import testing

from conftest import DEADLOCK_TIMEOUT

#: A process group whose named semaphore outlives it: the resource tracker,
#: which would unlink it, is killed with the group.
LEAKER = textwrap.dedent("""
    import multiprocessing, sys
    lock = multiprocessing.get_context("spawn").Lock()   # a named semaphore
    multiprocessing.resource_tracker.ensure_running()
    print("sem." + lock._semlock.name.lstrip("/"), flush=True)
    sys.stdin.read()                                     # until killed
""")


def test_a_name_nobody_uses_is_a_leak():
    before = testing.live_names()
    proc = subprocess.Popen([sys.executable, "-c", LEAKER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        name = proc.stdout.readline().strip()
        assert name.startswith("sem.mp-"), name
        assert name not in testing.leaked_names(since=before, timeout=0.0)   # in use
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(DEADLOCK_TIMEOUT)
        proc.stdout.close()
        proc.stdin.close()
    try:
        assert name in testing.leaked_names(since=before, timeout=0.0)
    finally:
        os.unlink(os.path.join("/dev/shm", name))


def test_a_name_a_live_process_uses_is_not_a_leak():
    before = testing.live_names()
    lock = multiprocessing.get_context("spawn").Lock()
    name = "sem." + lock._semlock.name.lstrip("/")
    assert name in testing.live_names() - before
    assert name not in testing.leaked_names(since=before, timeout=0.0)
    del lock
