"""CPython's own Pool tests, run against shmpool's Pool.

The classes ``_TestPool``, ``_TestPoolWorkerErrors`` and
``_TestPoolWorkerLifetime`` come from the running interpreter's
``Lib/test/_test_multiprocessing.py``, unedited; ``_cpython_multiprocessing_harness``
wires them to shmpool under each start method (see its docstring), and
``EXCLUDED.md`` lists the few tests skipped, each with its reason.

Collected by pytest as unittest TestCases, e.g.
``WithProcessesTestPool_spawn::test_imap``.
"""

from _cpython_multiprocessing_harness import BASES, EXCLUSIONS, POOL_BASES, cases_of

globals().update(cases_of(POOL_BASES))


def test_exclusions_name_real_tests():
    """Every row of EXCLUDED.md names a test of this interpreter's classes
    (a typo would silently un-exclude nothing useful, or skip nothing)."""
    from test import _test_multiprocessing as mptest
    missing = [key for key in EXCLUSIONS
               if key[0] not in BASES or not hasattr(getattr(mptest, key[0]), key[1])]
    assert not missing, f"EXCLUDED.md rows with no such test: {missing}"
