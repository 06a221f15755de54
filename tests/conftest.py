"""Fixtures shared by every test: start methods, the leak guard, timeouts."""

from __future__ import annotations

import gc
import multiprocessing
import os

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
    """Fail any test that leaves a shmpool segment or semaphore in /dev/shm."""
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
