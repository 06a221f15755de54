"""Build CPython's own ProcessPoolExecutor test classes over shmpool's executor.

``Lib/test/test_concurrent_futures`` makes its process-pool classes with
``create_executor_tests``: one class per pair of a test mixin (executor,
shutdown, wait, as_completed, initializer, deadlock tests) and a start-method
mixin (``ProcessPoolForkMixin``, ...), named ``ProcessPool<Method><Mixin>Test``.
This module finds those generated classes and makes the same pairs again,
with the start-method mixin replaced by a subclass whose ``executor_type``
is shmpool's executor (``_cpython_sources.ProcessPoolExecutor``) and whose
``get_context`` returns that start method's context.  Test bodies are never
edited.  Around each test:

- ``concurrent.futures.ProcessPoolExecutor`` is shmpool's (some tests call
  it directly);
- ``assert_python_ok`` (bound by name in the test modules) prepends to a
  ``-c`` script a prelude that does the same in the child interpreter and
  makes the test module importable there.

Which sources run (``_cpython_sources`` finds them):

- **the base**: the running interpreter's own ``test_concurrent_futures``;
  without one (3.11, 3.12), 3.10's single file, which runs on 3.11 and 3.12
  (or, failing that, 3.13's package); it is importable under its own name,
  ``test.test_concurrent_futures``, in every process;
- **additions**: the tests of 3.13's package that the base lacks (the
  ``max_tasks_per_child`` tests, for one), under the module name
  ``_cpython313_test_concurrent_futures``.  Loading it on an older
  interpreter only needs a few ``test.support`` names it lacks
  (``_cpython_sources.extend_test_support``).

The same classes are built a second time with the standard library's
own executor on shmpool's context (``_cpython_sources.StdlibProcessPoolExecutor``,
``get_context`` returning ``shmpool.get_context(method)``): its result queue
is then shmpool's SimpleQueue, read through its ``_reader`` end.  Those
classes are named ``OnShmpoolContext<generated name>_py<version>`` and
their exclusions are the rows of ``EXCLUDED_EXECUTOR_ON_CONTEXT.md``.  To
stay within CI's time, that second build leaves out the test mixins of
``NOT_ON_CONTEXT`` (see there why they add nothing on the context).

A source that cannot be found is reported by a skipped test naming it
(``MISSING``); classes are named ``<generated name>_py<version>``.  Tests in
``EXCLUDED_EXECUTOR.md`` become skips that give the reason.

Imported by worker processes too (a test may send ``self._test_traceback``,
a classmethod of a class built here), so it builds the same classes there.
"""

from __future__ import annotations

import importlib
import inspect
import multiprocessing
import pathlib
import re
import unittest
from unittest import mock

import concurrent.futures
from test.support import script_helper

import shmpool
from _cpython_sources import (
    CANONICAL,
    ProcessPoolExecutor,
    Source,
    StdlibProcessPoolExecutor,
    find_source,
    how_sought,
    install,
    installed_aliases,
    own_source,
)

#: The single-file version, whose tests run on 3.10 to 3.12.
BASE_VERSION = "3.10"
#: The newest version this harness knows; its extra tests are added.
NEWEST_VERSION = "3.13"
#: The package's modules holding process-pool test classes.
PACKAGE_MODULES = ("test_process_pool", "test_shutdown", "test_wait", "test_as_completed",
                   "test_init", "test_deadlock")
#: Test mixins not built a second time on shmpool's context.  They test
#: waiting on futures (``wait``, ``as_completed``: concurrent.futures._base),
#: which the context does not change; their results come back through the
#: result queue exactly as in the executor, shutdown, deadlock and
#: initializer tests that are built.  Together they take about as long as
#: all the others (100 s of a 220 s run on 2 cores).
NOT_ON_CONTEXT = ("WaitTests", "AsCompletedTests")
START_METHODS = [m for m in ("fork", "forkserver", "spawn")
                 if m in multiprocessing.get_all_start_methods()]
EXCLUDED_MD = pathlib.Path(__file__).with_name("EXCLUDED_EXECUTOR.md")
EXCLUDED_ON_CONTEXT_MD = pathlib.Path(__file__).with_name("EXCLUDED_EXECUTOR_ON_CONTEXT.md")
COMPAT_DIR = str(pathlib.Path(__file__).parent)

_GENERATED = re.compile(r"ProcessPool(Fork|Forkserver|Spawn)\w+Test")
_ROW = re.compile(r"^\|\s*`(?P<cls>\w+)`\s*\|\s*`(?P<test>\w+)`\s*\|\s*(?P<methods>[\w ,]+?)\s*\|"
                  r"\s*(?P<reason>.+?)\s*\|\s*$")


def read_exclusions(path: pathlib.Path = EXCLUDED_MD) -> dict[tuple[str, str, str], str]:
    """``{(test mixin or class, test name, start method): reason}`` from
    the table (a row for ``all`` start methods gives one key per method)."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _ROW.match(line)
        if not match:
            continue
        methods = [m.strip() for m in match["methods"].split(",")]
        if methods == ["all"]:
            methods = ["fork", "forkserver", "spawn"]
        unknown = set(methods) - {"fork", "forkserver", "spawn"}
        if unknown:
            raise ValueError(f"{path.name}: unknown start methods {unknown} in row {line!r}")
        for method in methods:
            key = (match["cls"], match["test"], method)
            if key in found:
                raise ValueError(f"{path.name}: duplicate row for {key}")
            found[key] = match["reason"]
    return found


def unknown_rows(exclusions) -> list[tuple[str, str]]:
    """The ``(class, test)`` rows of *exclusions* that name no test of a
    loaded source (a typo would skip nothing)."""
    def known(cls_name, test_name):
        return any(hasattr(getattr(module, cls_name, None), test_name)
                   for modules in LOADED.values() for module in modules)
    return sorted({key[:2] for key in exclusions if not known(*key[:2])})


# -- which sources, imported how --------------------------------------------

def plan() -> tuple[list[tuple[Source, str]], dict[str, str]]:
    """``([(source, module name)], {version: why it does not run})``, base first."""
    missing = {}
    base = own_source()
    if base is None:
        for version in (BASE_VERSION, NEWEST_VERSION):
            base = find_source(version)
            if base is not None:
                break
            missing[version] = f"CPython {version}'s test_concurrent_futures not found ({how_sought(version)})"
    if base is None:
        return [], missing
    chosen = [(base, CANONICAL)]
    if base.version != NEWEST_VERSION and NEWEST_VERSION not in missing:
        newest = find_source(NEWEST_VERSION)
        if newest is None:
            missing[NEWEST_VERSION] = (
                f"CPython {NEWEST_VERSION}'s test_concurrent_futures not found, so its tests "
                f"that {base.version}'s lacks (max_tasks_per_child, ...) do not run "
                f"({how_sought(NEWEST_VERSION)})")
        else:
            chosen.append((newest, f"_cpython{NEWEST_VERSION.replace('.', '')}_{CANONICAL.split('.')[1]}"))
    return chosen, missing


def load(source: Source, name: str) -> tuple[list, dict[str, str]]:
    """Import *source* as *name*: ``([modules], {module: import error})``."""
    if not source.native:
        install({name: source.location})
    modules, failed = [], {}
    if not source.is_package:
        return [importlib.import_module(name)], failed
    importlib.import_module(name)
    for module in PACKAGE_MODULES:
        try:
            modules.append(importlib.import_module(f"{name}.{module}"))
        except Exception as exc:          # reported by a failing test, not dropped
            failed[f"{name}.{module}"] = repr(exc)
    return modules, failed


def generated_classes(modules) -> dict[str, type]:
    """The process-pool classes ``create_executor_tests`` made, by name."""
    found = {}
    for module in modules:
        for name, cls in vars(module).items():
            if (isinstance(cls, type) and _GENERATED.fullmatch(name)
                    and issubclass(cls, unittest.TestCase) and len(cls.__bases__) >= 2
                    and getattr(cls.__bases__[1], "ctx", None) in START_METHODS):
                found[name] = cls
    return found


# -- wiring ------------------------------------------------------------------

def _prelude(on_context: bool) -> str:
    """Run first in a child interpreter's ``-c`` script (started with -I, it
    would not see this directory or the sources otherwise)."""
    return ("import sys\n"
            f"sys.path.insert(0, {COMPAT_DIR!r})\n"
            "import _cpython_sources\n"
            f"_cpython_sources.setup_child({installed_aliases()!r}, {on_context!r})\n")


def _wrap_assert_python_ok(original, on_context: bool):
    def assert_python_ok(*args, **env_vars):
        args = list(args)
        if "-c" in args[:-1]:
            i = args.index("-c") + 1
            args[i] = _prelude(on_context) + args[i]
        return original(*args, **env_vars)
    return assert_python_ok


def _patches(modules, on_context: bool = False):
    """``(target, attribute, value)`` to apply around every test: shmpool's
    executor, or (*on_context*) the standard library's on shmpool's context."""
    executor = StdlibProcessPoolExecutor if on_context else ProcessPoolExecutor
    wrapped = _wrap_assert_python_ok(script_helper.assert_python_ok, on_context)
    found = [(concurrent.futures, "ProcessPoolExecutor", executor),
             (script_helper, "assert_python_ok", wrapped)]
    for module in modules:
        if getattr(module, "assert_python_ok", None) is script_helper.assert_python_ok:
            found.append((module, "assert_python_ok", wrapped))
    return found


#: Options of the standard library executor that newer tests use, by a word
#: of those tests' names.  On the context the standard library's own
#: executor runs, so a test from a newer CPython's sources that uses one
#: the running interpreter's executor lacks (3.10 has no
#: ``max_tasks_per_child``) is skipped there.
_NEWER_OPTIONS = {"max_tasks": "max_tasks_per_child"}


def _stdlib_lacks(test_name: str) -> str | None:
    """The option the test *test_name* needs and this interpreter's
    ``concurrent.futures.ProcessPoolExecutor`` lacks, if any."""
    parameters = inspect.signature(concurrent.futures.ProcessPoolExecutor).parameters
    for word, option in _NEWER_OPTIONS.items():
        if word in test_name and option not in parameters:
            return option
    return None


def _drop_test_state(case: unittest.TestCase) -> None:
    """Drop what a test kept on its instance (``FailingInitializerMixin``
    keeps a queue made from the context as ``log_queue`` and in
    ``executor_kwargs``).  Under pytest the TestCase outlives its test, so a
    shmpool queue kept there would still hold its store when the leak check
    looks; unittest's own runner drops the instance instead.  Private
    attributes (unittest's) and test methods (which pytest binds on the
    instance) stay."""
    for name in [name for name in vars(case) if not name.startswith(("_", "test"))]:
        delattr(case, name)


def _shmpool_mixin(stdlib_mixin: type, patches, on_context: bool = False) -> type:
    """*stdlib_mixin* (``ProcessPoolSpawnMixin``, ...) with shmpool's
    executor, or (*on_context*) the standard library's on shmpool's context."""

    def setUp(self):
        for target, attribute, value in patches:
            patcher = mock.patch.object(target, attribute, value)
            patcher.start()
            self.addCleanup(patcher.stop)
        if on_context:
            self.addCleanup(_drop_test_state, self)
        super(mixin, self).setUp()

    def get_context(self):
        if on_context:
            return shmpool.get_context(self.ctx)
        return multiprocessing.get_context(self.ctx)

    name = f"{'OnShmpoolContext' if on_context else 'Shmpool'}{stdlib_mixin.__name__}"
    mixin = type(name, (stdlib_mixin,), {
        "executor_type": StdlibProcessPoolExecutor if on_context else ProcessPoolExecutor,
        "setUp": setUp, "get_context": get_context,
        "__module__": __name__, "__qualname__": name})
    return mixin


def _excluded(func, reason: str, table: pathlib.Path):
    return unittest.skip(f"excluded, see tests/compat/{table.name}: {reason}")(func)


def build(classes: dict[str, type], version: str, patches, exclusions,
          already: dict[str, set[str]], on_context: bool = False) -> dict[str, type]:
    """shmpool's copy of each generated class (or, *on_context*, the
    standard library executor's on shmpool's context); a test whose name is
    in ``already[generated name]`` (run from another source) is left out."""
    loader = unittest.TestLoader()
    table = EXCLUDED_ON_CONTEXT_MD if on_context else EXCLUDED_MD
    mixins: dict[type, type] = {}
    built = {}
    for generated_name, generated in sorted(classes.items()):
        test_mixin, stdlib_mixin, *rest = generated.__bases__
        if on_context and test_mixin.__name__ in NOT_ON_CONTEXT:
            continue
        if stdlib_mixin not in mixins:
            mixins[stdlib_mixin] = _shmpool_mixin(stdlib_mixin, patches, on_context)
        attrs = {}
        names = set(loader.getTestCaseNames(generated))
        kept = names - already.get(generated_name, set())
        if not kept:
            continue
        for test_name in names - kept:
            attrs[test_name] = None              # runs from the other source
        for test_name in kept:
            reason = exclusions.get((test_mixin.__name__, test_name, stdlib_mixin.ctx))
            if reason is not None:
                attrs[test_name] = _excluded(getattr(generated, test_name), reason, table)
            elif on_context and (missing := _stdlib_lacks(test_name)):
                attrs[test_name] = unittest.skip(
                    f"the standard library executor of this interpreter has no {missing} "
                    f"(Python 3.11 and later), which this newer CPython test uses")(
                        getattr(generated, test_name))
        name = f"{'OnShmpoolContext' if on_context else ''}{generated_name}_py{version.replace('.', '')}"
        attrs.update(__module__=__name__, __qualname__=name, on_context=on_context)
        built[name] = type(name, (test_mixin, mixins[stdlib_mixin], *rest), attrs)
        already.setdefault(generated_name, set()).update(kept)
    return built


EXCLUSIONS = read_exclusions()
EXCLUSIONS_ON_CONTEXT = read_exclusions(EXCLUDED_ON_CONTEXT_MD)
SOURCES, MISSING = plan()
LOADED: dict[str, list] = {}            # version -> modules
IMPORT_ERRORS: dict[str, str] = {}      # module name -> error
TEST_CASES: dict[str, type] = {}


def _build_all() -> None:
    for source, name in SOURCES:
        modules, failed = load(source, name)
        LOADED[source.version] = modules
        IMPORT_ERRORS.update(failed)
    modules = [m for loaded in LOADED.values() for m in loaded]
    for on_context, exclusions in ((False, EXCLUSIONS), (True, EXCLUSIONS_ON_CONTEXT)):
        patches, already = _patches(modules, on_context), {}
        for source, _ in SOURCES:
            TEST_CASES.update(build(generated_classes(LOADED[source.version]), source.version,
                                    patches, exclusions, already, on_context))


_build_all()
# Module attributes, so pickle finds the classes by name in any process.
globals().update(TEST_CASES)
