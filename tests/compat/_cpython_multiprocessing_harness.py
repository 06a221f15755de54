"""Build CPython's own Pool and queue test classes over shmpool's.

Takes ``_TestPool``, ``_TestPoolWorkerErrors``, ``_TestPoolWorkerLifetime``
and ``_TestQueue`` from the running interpreter's
``test._test_multiprocessing`` and makes, per
start method, a ``unittest.TestCase`` the way that module's
``install_tests_in_module_dict`` does (``class Temp(base, Mixin, TestCase)``,
named ``With<Type><Name>``), plus a ``_<method>`` suffix.  The mixin is the
stdlib ``ProcessesMixin`` (so its ``setUpClass``/``tearDownClass`` dangling
checks run) with ``Pool``, ``Queue`` and ``JoinableQueue`` replaced by
shmpool's, bound to ``multiprocessing.get_context(method)``.  Nothing sets
the global start method: each pool and queue gets its context explicitly.
``TestSimpleQueue`` is a plain TestCase that calls ``multiprocessing.*``
directly; it gets a subclass per start method too.

Two classes call ``multiprocessing.Pool(...)`` rather than ``self.Pool(...)``,
and one test starts a fresh interpreter that does
``from multiprocessing import Pool``.  Without touching the test bodies, each
test therefore runs with

- ``multiprocessing.Pool``, ``Queue``, ``JoinableQueue`` and
  ``SimpleQueue`` patched to the same shmpool factories, and
  ``multiprocessing.queues.Queue`` (which tests subclass, and which their
  ``close_queue`` helper checks with ``isinstance``) to shmpool's Queue;
  for ``TestSimpleQueue`` also ``multiprocessing.Process`` and ``Event``
  to the start method's, and
- ``test.support.script_helper.assert_python_ok`` wrapped so that a ``-c``
  script first makes ``multiprocessing.Pool`` shmpool's (bound to the same
  start method) in the child interpreter.

Both patches are undone after each test.

Tests excluded (rows of ``EXCLUDED.md``) are kept but replaced by a skip
naming the reason, so they show in the report.

The Pool classes are built a second time with the standard library's own
``multiprocessing.pool.Pool`` given ``context=shmpool.get_context(method)``
(named ``OnShmpoolContext<Name>_<method>``): its task and result queues are
then shmpool's SimpleQueues, driven through their ``_reader``/``_writer``
ends.  Their exclusions are the rows of ``EXCLUDED_ON_CONTEXT.md``.

This module is imported by worker processes too (spawn/forkserver unpickle
the test classes to call classmethods such as ``_test_traceback``), so it
stays light: no pytest, no conftest.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import multiprocessing.queues
import pathlib
import re
import unittest
from unittest import mock

from test import _test_multiprocessing as mptest   # may raise SkipTest
from test.support import script_helper

import shmpool
from shmpool._pool import Pool as ShmpoolPool
from shmpool._queue import JoinableQueue as ShmpoolJoinableQueue
from shmpool._queue import Queue as ShmpoolQueue
from shmpool._queue import SimpleQueue as ShmpoolSimpleQueue

POOL_BASES = ("_TestPool", "_TestPoolWorkerErrors", "_TestPoolWorkerLifetime")
QUEUE_BASES = ("_TestQueue", "TestSimpleQueue")
STANDALONE = ("TestSimpleQueue",)       # plain TestCases, not BaseTestCase mixins
BASES = POOL_BASES + QUEUE_BASES
START_METHODS = [m for m in ("fork", "forkserver", "spawn")
                 if m in multiprocessing.get_all_start_methods()]
EXCLUDED_MD = pathlib.Path(__file__).with_name("EXCLUDED.md")
EXCLUDED_ON_CONTEXT_MD = pathlib.Path(__file__).with_name("EXCLUDED_ON_CONTEXT.md")

_ROW = re.compile(r"^\|\s*`(?P<cls>\w+)`\s*\|\s*`(?P<test>\w+)`\s*\|\s*(?P<reason>.+?)\s*\|\s*$")


def read_exclusions(path: pathlib.Path = EXCLUDED_MD) -> dict[tuple[str, str], str]:
    """``{(base class, test name): reason}`` from the table in *path*."""
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


def pool_factory(method: str, on_context: bool = False):
    """``multiprocessing.Pool``'s signature, building shmpool's Pool over
    *method*'s context unless a context is given; *on_context*: the
    standard library's Pool over shmpool's context for *method* instead."""
    if on_context:
        ctx, pool_class = shmpool.get_context(method), multiprocessing.pool.Pool
    else:
        ctx, pool_class = multiprocessing.get_context(method), ShmpoolPool

    def Pool(processes=None, initializer=None, initargs=(), maxtasksperchild=None,
             context=None, **kwargs):
        return pool_class(processes, initializer, initargs, maxtasksperchild,
                          ctx if context is None else context, **kwargs)

    Pool.__qualname__ = Pool.__name__ = f"{'Stdlib' if on_context else 'Shmpool'}Pool_{method}"
    return Pool


def queue_factories(method: str) -> dict[str, object]:
    """``Queue``, ``JoinableQueue`` and ``SimpleQueue`` with the standard
    library's signatures, over *method*'s context unless one is given."""
    ctx = multiprocessing.get_context(method)

    def Queue(maxsize=0, *, ctx=None, **kwargs):
        return ShmpoolQueue(maxsize, ctx=ctx or default_ctx, **kwargs)

    def JoinableQueue(maxsize=0, *, ctx=None, **kwargs):
        return ShmpoolJoinableQueue(maxsize, ctx=ctx or default_ctx, **kwargs)

    def SimpleQueue(*, ctx=None, **kwargs):
        return ShmpoolSimpleQueue(ctx=ctx or default_ctx, **kwargs)

    default_ctx = ctx
    return {"Queue": Queue, "JoinableQueue": JoinableQueue, "SimpleQueue": SimpleQueue}


def _subprocess_prelude(method: str, on_context: bool) -> str:
    """Code run first in a ``-c`` child interpreter: the same redirection of
    ``multiprocessing.Pool`` as in this process (a child started with ``-I``
    sees no PYTHONPATH, so it cannot import this module)."""
    if on_context:
        return (
            "import multiprocessing as _shm_mp, multiprocessing.pool, shmpool as _shm\n"
            f"_shm_ctx = _shm.get_context({method!r})\n"
            "_shm_mp.Pool = lambda *a, **k: _shm_mp.pool.Pool(*a, **{'context': _shm_ctx, **k})\n"
        )
    return (
        "import multiprocessing as _shm_mp, shmpool._pool as _shm_pool\n"
        f"_shm_ctx = _shm_mp.get_context({method!r})\n"
        "_shm_mp.Pool = lambda *a, **k: _shm_pool.Pool(*a, **{'context': _shm_ctx, **k})\n"
    )


def _wrap_assert_python_ok(method: str, on_context: bool, original):
    prelude = _subprocess_prelude(method, on_context)

    def assert_python_ok(*args, **env_vars):
        args = list(args)
        if "-c" in args[:-1]:
            i = args.index("-c") + 1
            args[i] = prelude + args[i]
        return original(*args, **env_vars)

    return assert_python_ok


def make_mixin(method: str, on_context: bool = False) -> type:
    """``ProcessesMixin`` with shmpool's Pool over *method*'s context (or,
    *on_context*, the standard library's over shmpool's context)."""
    ctx = multiprocessing.get_context(method)
    factory = pool_factory(method, on_context)
    queues = queue_factories(method)
    attrs = {
        "start_method": method,
        "Pool": staticmethod(factory),
        "Process": ctx.Process,
        "Queue": staticmethod(queues["Queue"]),
        "JoinableQueue": staticmethod(queues["JoinableQueue"]),
    }
    # Keep the mixin's other factories on the same start method.
    for name in ("Pipe", "Lock", "RLock", "Semaphore",
                 "BoundedSemaphore", "Condition", "Event", "Barrier", "Value",
                 "Array", "RawValue", "RawArray"):
        if hasattr(mptest.ProcessesMixin, name):
            attrs[name] = staticmethod(getattr(ctx, name))

    def setUp(self):
        super(mixin, self).setUp()
        _patch(self, method, {}, on_context)

    attrs["setUp"] = setUp
    name = f"{'OnContext' if on_context else 'Shmpool'}ProcessesMixin_{method}"
    mixin = type(name, (mptest.ProcessesMixin,), attrs)
    mixin.__module__ = __name__
    return mixin


def _patch(case: unittest.TestCase, method: str, extra: dict, on_context: bool = False) -> None:
    """Point the ``multiprocessing`` names the tests call directly at
    shmpool's classes (and *extra* ``multiprocessing`` names at the given
    values) until *case* ends."""
    replacements = [(multiprocessing, "Pool", pool_factory(method, on_context)),
                    (multiprocessing.queues, "Queue", ShmpoolQueue),
                    (script_helper, "assert_python_ok",
                     _wrap_assert_python_ok(method, on_context, script_helper.assert_python_ok))]
    replacements += [(multiprocessing, name, value)
                     for name, value in {**queue_factories(method), **extra}.items()]
    for target, name, value in replacements:
        patcher = mock.patch.object(target, name, value)
        patcher.start()
        case.addCleanup(patcher.stop)


def _standalone_case(base_name: str, method: str, attrs: dict) -> type:
    """A subclass of the plain TestCase *base_name* whose direct calls of
    ``multiprocessing.Process``/``Event`` use *method*'s context."""
    ctx = multiprocessing.get_context(method)

    def setUp(self):
        super(case, self).setUp()
        _patch(self, method, {"Process": ctx.Process, "Event": ctx.Event})

    name = f"{base_name}_{method}"
    case = type(name, (getattr(mptest, base_name),), {**attrs, "setUp": setUp})
    return case


def _excluded(func, reason: str, table: pathlib.Path):
    return unittest.skip(f"excluded, see tests/compat/{table.name}: {reason}")(func)


def make_test_cases(method: str, exclusions: dict[tuple[str, str], str],
                    on_context: bool = False) -> dict[str, type]:
    """The classes for *method*, as ``{name: TestCase subclass}``;
    *on_context*: the Pool classes for the standard library's Pool over
    shmpool's context."""
    mixin = make_mixin(method, on_context)
    cases = {}
    for base_name in POOL_BASES if on_context else BASES:
        base = getattr(mptest, base_name)
        attrs = {}
        for (cls_name, test_name), reason in exclusions.items():
            if cls_name == base_name and hasattr(base, test_name):
                table = EXCLUDED_ON_CONTEXT_MD if on_context else EXCLUDED_MD
                attrs[test_name] = _excluded(getattr(base, test_name), reason, table)
        if base_name in STANDALONE:
            case = _standalone_case(base_name, method, attrs)
        else:
            assert "processes" in base.ALLOWED_TYPES, base.ALLOWED_TYPES
            # As install_tests_in_module_dict: 'With' + type + name[1:].
            prefix = "OnShmpoolContext" if on_context else "WithProcesses"
            name = f"{prefix}{base_name[1:]}_{method}"
            case = type(name, (base, mixin, unittest.TestCase), attrs)
        name = case.__name__
        case.__qualname__ = name
        case.cpython_base = base_name
        case.on_context = on_context
        case.__module__ = __name__
        cases[name] = case
    return cases


EXCLUSIONS = read_exclusions()
EXCLUSIONS_ON_CONTEXT = read_exclusions(EXCLUDED_ON_CONTEXT_MD)
TEST_CASES: dict[str, dict[str, type]] = {}
for _method in START_METHODS:
    TEST_CASES[_method] = {**make_test_cases(_method, EXCLUSIONS),
                           **make_test_cases(_method, EXCLUSIONS_ON_CONTEXT, on_context=True)}
    # Module attributes, so pickle finds the classes by name in any process.
    globals().update(TEST_CASES[_method])
del _method


def cases_of(bases: tuple[str, ...], on_context: bool = False) -> dict[str, type]:
    """Every start method's test cases built from the classes *bases*: for
    shmpool's classes, or (*on_context*) for the standard library's Pool
    over shmpool's context."""
    return {name: case for cases in TEST_CASES.values() for name, case in cases.items()
            if case.cpython_base in bases and case.on_context == on_context}
