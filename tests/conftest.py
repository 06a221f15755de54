"""Fixtures shared by every test: start methods, the leak guard, timeouts."""

from __future__ import annotations

import gc
import multiprocessing
import os
import time

import pytest
from hypothesis import HealthCheck, settings

from shmpool import testing

START_METHODS = [m for m in ("fork", "forkserver", "spawn")
                 if m in multiprocessing.get_all_start_methods()]
#: Waits in tests use this: reaching it means a deadlock, never "slow CI".
DEADLOCK_TIMEOUT = 60

settings.register_profile("default", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("expensive", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(params=START_METHODS)
def mp_context(request):
    """A multiprocessing context for each start method."""
    return multiprocessing.get_context(request.param)


@pytest.fixture(autouse=True)
def no_leaked_names():
    """Fail any test that leaves a name in /dev/shm that nobody can use any
    more: shmpool's, or the test's own multiprocessing semaphores (a named
    semaphore of a process killed together with its resource tracker).
    Names other tests (xdist neighbours) still use are not counted."""
    before = testing.live_names()
    yield
    gc.collect()
    leaked = testing.leaked_names(since=before, timeout=5.0)
    assert not leaked, f"test left names in /dev/shm: {sorted(leaked)}"


@pytest.fixture
def store():
    """A 64 MiB ObjectStore, closed after the test."""
    from shmpool import ObjectStore
    with ObjectStore(64 * 1024 * 1024) as s:
        yield s


# -- session guard: nothing at all left in /dev/shm -------------------------
#
# The per-test fixture above fails the test that leaves a name nobody uses.
# The session also checks, once every worker has ended, that /dev/shm holds
# no name that was not there when it started: that catches a name some
# process still used when its test ended, and never let go.  (Only the
# process that runs the session, not each xdist worker.)

_names_at_start: set[str] = set()
_names_left: list[str] = []


def _is_session_owner(config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_sessionstart(session):
    if _is_session_owner(session.config):
        _names_at_start.update(testing.live_names())


def pytest_sessionfinish(session, exitstatus):
    if not _is_session_owner(session.config):
        return
    deadline = time.monotonic() + 15      # resource trackers unlink as their clients end
    while (left := testing.live_names() - _names_at_start) and time.monotonic() < deadline:
        time.sleep(0.1)                   # polling a directory; there is no event
    if left:
        _names_left.extend(sorted(left))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _names_left:
        terminalreporter.section("names left in /dev/shm", red=True)
        terminalreporter.write_line(
            "the test session left these names behind (a leak, by shmpool or by a "
            "test's own multiprocessing objects): " + ", ".join(_names_left))


# -- opt-in long runs --------------------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (long soaks)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    deselected = [item for item in items if "slow" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if "slow" not in item.keywords]
