"""CPython's own ProcessPoolExecutor tests, run against shmpool's executor.

The process-pool classes of ``Lib/test/test_concurrent_futures`` (this
interpreter's own, or another CPython's: see ``_cpython_executor_harness``)
run unedited, per start method, with shmpool's executor; classes are named
``<CPython's generated name>_py<version>``, e.g.
``ProcessPoolSpawnProcessPoolExecutorTest_py310::test_map``.
``EXCLUDED_EXECUTOR.md`` lists the tests skipped, each with its reason.
"""

import pytest

from _cpython_executor_harness import (
    EXCLUSIONS,
    IMPORT_ERRORS,
    MISSING,
    SOURCES,
    TEST_CASES,
    unknown_rows,
)

globals().update({name: case for name, case in TEST_CASES.items() if not case.on_context})


@pytest.mark.parametrize("version", sorted(MISSING) or [None])
def test_cpython_sources_found(version):
    """A CPython copy of the tests that could not be found is a skip that
    says which and why, never a silent gap."""
    if version is not None:
        pytest.skip(MISSING[version])
    assert SOURCES and TEST_CASES


def test_cpython_test_modules_import():
    assert not IMPORT_ERRORS, f"CPython test modules that failed to import: {IMPORT_ERRORS}"


def test_exclusions_name_real_tests():
    """Every row of EXCLUDED_EXECUTOR.md names a test of a loaded source;
    rows only a missing source has are not checked."""
    unknown = unknown_rows(EXCLUSIONS)
    if unknown and MISSING:
        pytest.skip(f"rows not checked, their source may be missing ({sorted(MISSING)}): {unknown}")
    assert not unknown, f"EXCLUDED_EXECUTOR.md rows with no such test: {unknown}"
