"""Build CPython's own Pool test classes over shmpool's Pool.

Takes ``_TestPool``, ``_TestPoolWorkerErrors`` and ``_TestPoolWorkerLifetime``
from the running interpreter's ``test._test_multiprocessing`` and makes, per
start method, a ``unittest.TestCase`` the way that module's
``install_tests_in_module_dict`` does (``class Temp(base, Mixin, TestCase)``,
named ``With<Type><Name>``), plus a ``_<method>`` suffix.  The mixin is the
stdlib ``ProcessesMixin`` (so its ``setUpClass``/``tearDownClass`` dangling
checks run) with ``Pool`` replaced by shmpool's Pool bound to
``multiprocessing.get_context(method)``.  Nothing sets the global start
method: each pool gets its context explicitly.

Two classes call ``multiprocessing.Pool(...)`` rather than ``self.Pool(...)``,
and one test starts a fresh interpreter that does
``from multiprocessing import Pool``.  Without touching the test bodies, each
test therefore runs with

- ``multiprocessing.Pool`` patched to the same shmpool factory, and
- ``test.support.script_helper.assert_python_ok`` wrapped so that a ``-c``
  script first makes ``multiprocessing.Pool`` shmpool's (bound to the same
  start method) in the child interpreter.

Both patches are undone after each test.

Tests excluded (rows of ``EXCLUDED.md``) are kept but replaced by a skip
naming the reason, so they show in the report.

This module is imported by worker processes too (spawn/forkserver unpickle
the test classes to call classmethods such as ``_test_traceback``), so it
stays light: no pytest, no conftest.
"""

from __future__ import annotations

import multiprocessing
import pathlib
import re
import unittest
from unittest import mock

from test import _test_multiprocessing as mptest   # may raise SkipTest
from test.support import script_helper

from shmpool._pool import Pool as ShmpoolPool

BASES = ("_TestPool", "_TestPoolWorkerErrors", "_TestPoolWorkerLifetime")
START_METHODS = [m for m in ("fork", "forkserver", "spawn")
                 if m in multiprocessing.get_all_start_methods()]
EXCLUDED_MD = pathlib.Path(__file__).with_name("EXCLUDED.md")

_ROW = re.compile(r"^\|\s*`(?P<cls>\w+)`\s*\|\s*`(?P<test>\w+)`\s*\|\s*(?P<reason>.+?)\s*\|\s*$")


def read_exclusions(path: pathlib.Path = EXCLUDED_MD) -> dict[tuple[str, str], str]:
    """``{(base class, test name): reason}`` from the table in EXCLUDED.md."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _ROW.match(line)
        if match:
            key = (match["cls"], match["test"])
            if match["cls"] not in BASES:
                raise ValueError(f"{path.name}: unknown class in row {line!r}")
            if key in found:
                raise ValueError(f"{path.name}: duplicate row for {key}")
            found[key] = match["reason"]
    return found


def pool_factory(method: str):
    """``multiprocessing.Pool``'s signature, building shmpool's Pool over
    *method*'s context unless a context is given."""
    ctx = multiprocessing.get_context(method)

    def Pool(processes=None, initializer=None, initargs=(), maxtasksperchild=None,
             context=None, **kwargs):
        return ShmpoolPool(processes, initializer, initargs, maxtasksperchild,
                           ctx if context is None else context, **kwargs)

    Pool.__qualname__ = Pool.__name__ = f"ShmpoolPool_{method}"
    return Pool


def _subprocess_prelude(method: str) -> str:
    """Code run first in a ``-c`` child interpreter: the same redirection of
    ``multiprocessing.Pool`` as in this process (a child started with ``-I``
    sees no PYTHONPATH, so it cannot import this module)."""
    return (
        "import multiprocessing as _shm_mp, shmpool._pool as _shm_pool\n"
        f"_shm_ctx = _shm_mp.get_context({method!r})\n"
        "_shm_mp.Pool = lambda *a, **k: _shm_pool.Pool(*a, **{'context': _shm_ctx, **k})\n"
    )


def _wrap_assert_python_ok(method: str, original):
    prelude = _subprocess_prelude(method)

    def assert_python_ok(*args, **env_vars):
        args = list(args)
        if "-c" in args[:-1]:
            i = args.index("-c") + 1
            args[i] = prelude + args[i]
        return original(*args, **env_vars)

    return assert_python_ok


def make_mixin(method: str) -> type:
    """``ProcessesMixin`` with shmpool's Pool over *method*'s context."""
    ctx = multiprocessing.get_context(method)
    factory = pool_factory(method)
    attrs = {
        "start_method": method,
        "Pool": staticmethod(factory),
        "Process": ctx.Process,
    }
    # Keep the mixin's other factories on the same start method.
    for name in ("Pipe", "Queue", "JoinableQueue", "Lock", "RLock", "Semaphore",
                 "BoundedSemaphore", "Condition", "Event", "Barrier", "Value",
                 "Array", "RawValue", "RawArray"):
        if hasattr(mptest.ProcessesMixin, name):
            attrs[name] = staticmethod(getattr(ctx, name))

    def setUp(self):
        super(mixin, self).setUp()
        for target, name, value in (
                (multiprocessing, "Pool", factory),
                (script_helper, "assert_python_ok",
                 _wrap_assert_python_ok(method, script_helper.assert_python_ok))):
            patcher = mock.patch.object(target, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)

    attrs["setUp"] = setUp
    mixin = type(f"ShmpoolProcessesMixin_{method}", (mptest.ProcessesMixin,), attrs)
    mixin.__module__ = __name__
    return mixin


def _excluded(func, reason: str):
    return unittest.skip(f"excluded, see tests/compat/EXCLUDED.md: {reason}")(func)


def make_test_cases(method: str, exclusions: dict[tuple[str, str], str]) -> dict[str, type]:
    """The three classes for *method*, as ``{name: TestCase subclass}``."""
    mixin = make_mixin(method)
    cases = {}
    for base_name in BASES:
        base = getattr(mptest, base_name)
        assert "processes" in base.ALLOWED_TYPES, base.ALLOWED_TYPES
        attrs = {}
        for (cls_name, test_name), reason in exclusions.items():
            if cls_name == base_name and hasattr(base, test_name):
                attrs[test_name] = _excluded(getattr(base, test_name), reason)
        # As install_tests_in_module_dict: 'With' + type + name[1:].
        name = f"WithProcesses{base_name[1:]}_{method}"
        case = type(name, (base, mixin, unittest.TestCase), attrs)
        case.__qualname__ = name
        case.__module__ = __name__
        cases[name] = case
    return cases


EXCLUSIONS = read_exclusions()
TEST_CASES: dict[str, dict[str, type]] = {}
for _method in START_METHODS:
    TEST_CASES[_method] = make_test_cases(_method, EXCLUSIONS)
    # Module attributes, so pickle finds the classes by name in any process.
    globals().update(TEST_CASES[_method])
del _method
