"""CPython's own Pool and ProcessPoolExecutor tests, run against the
standard library's Pool and executor over shmpool's context.

``multiprocessing.pool.Pool(context=shmpool.get_context(method))`` is the
standard library's Pool whose task and result queues are shmpool's
SimpleQueues, driven through their ``_reader``/``_writer`` ends;
``concurrent.futures.ProcessPoolExecutor(mp_context=shmpool.get_context(method))``
the standard library's executor whose result queue is.

- Pool: ``_TestPool``, ``_TestPoolWorkerErrors`` and
  ``_TestPoolWorkerLifetime`` of the running interpreter's
  ``Lib/test/_test_multiprocessing.py`` (``_cpython_multiprocessing_harness``),
  e.g. ``OnShmpoolContextTestPool_spawn::test_imap``; skipped tests are
  listed in ``EXCLUDED_ON_CONTEXT.md``.
- Executor: the process-pool classes of ``Lib/test/test_concurrent_futures``
  that ``test_cpython_executor.py`` runs against shmpool's executor
  (``_cpython_executor_harness``), except the ``wait``/``as_completed``
  ones (``NOT_ON_CONTEXT``: they add nothing here and double the time), e.g.
  ``OnShmpoolContextProcessPoolSpawnProcessPoolExecutorTest_py310::test_map``;
  skipped tests are listed in ``EXCLUDED_EXECUTOR_ON_CONTEXT.md``.

All of them run, unedited, under every start method.
"""

import pytest

#: Long (the standard library's own pools, under every start method), and
#: what it checks, the context's queues, is the same code on every Python.
pytestmark = pytest.mark.once

from _cpython_executor_harness import EXCLUSIONS_ON_CONTEXT, MISSING, unknown_rows
from _cpython_executor_harness import TEST_CASES as EXECUTOR_CASES
from _cpython_multiprocessing_harness import POOL_BASES, cases_of

globals().update(cases_of(POOL_BASES, on_context=True))
globals().update({name: case for name, case in EXECUTOR_CASES.items() if case.on_context})


def test_executor_exclusions_name_real_tests():
    """Every row of EXCLUDED_EXECUTOR_ON_CONTEXT.md names a test of a loaded
    source; rows only a missing source has are not checked."""
    unknown = unknown_rows(EXCLUSIONS_ON_CONTEXT)
    if unknown and MISSING:
        pytest.skip(f"rows not checked, their source may be missing ({sorted(MISSING)}): {unknown}")
    assert not unknown, f"EXCLUDED_EXECUTOR_ON_CONTEXT.md rows with no such test: {unknown}"
