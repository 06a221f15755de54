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

A source that cannot be found is reported by a skipped test naming it
(``MISSING``); classes are named ``<generated name>_py<version>``.  Tests in
``EXCLUDED_EXECUTOR.md`` become skips that give the reason.

Imported by worker processes too (a test may send ``self._test_traceback``,
a classmethod of a class built here), so it builds the same classes there.
"""

from __future__ import annotations

import importlib
import multiprocessing
import pathlib
import re
import unittest
from unittest import mock

import concurrent.futures
from test.support import script_helper

from _cpython_sources import (
    CANONICAL,
    ProcessPoolExecutor,
    Source,
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
START_METHODS = [m for m in ("fork", "forkserver", "spawn")
                 if m in multiprocessing.get_all_start_methods()]
EXCLUDED_MD = pathlib.Path(__file__).with_name("EXCLUDED_EXECUTOR.md")
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

def _prelude() -> str:
    """Run first in a child interpreter's ``-c`` script (started with -I, it
    would not see this directory or the sources otherwise)."""
    return ("import sys\n"
            f"sys.path.insert(0, {COMPAT_DIR!r})\n"
            "import _cpython_sources\n"
            f"_cpython_sources.setup_child({installed_aliases()!r})\n")


def _wrap_assert_python_ok(original):
    def assert_python_ok(*args, **env_vars):
        args = list(args)
        if "-c" in args[:-1]:
            i = args.index("-c") + 1
            args[i] = _prelude() + args[i]
        return original(*args, **env_vars)
    return assert_python_ok


def _patches(modules):
    """``(target, attribute, value)`` to apply around every test."""
    found = [(concurrent.futures, "ProcessPoolExecutor", ProcessPoolExecutor),
             (script_helper, "assert_python_ok",
              _wrap_assert_python_ok(script_helper.assert_python_ok))]
    for module in modules:
        if getattr(module, "assert_python_ok", None) is script_helper.assert_python_ok:
            found.append((module, "assert_python_ok",
                          _wrap_assert_python_ok(script_helper.assert_python_ok)))
    return found


def _shmpool_mixin(stdlib_mixin: type, patches) -> type:
    """*stdlib_mixin* (``ProcessPoolSpawnMixin``, ...) with shmpool's executor."""

    def setUp(self):
        for target, attribute, value in patches:
            patcher = mock.patch.object(target, attribute, value)
            patcher.start()
            self.addCleanup(patcher.stop)
        super(mixin, self).setUp()

    def get_context(self):
        return multiprocessing.get_context(self.ctx)

    name = f"Shmpool{stdlib_mixin.__name__}"
    mixin = type(name, (stdlib_mixin,), {
        "executor_type": ProcessPoolExecutor, "setUp": setUp, "get_context": get_context,
        "__module__": __name__, "__qualname__": name})
    return mixin


def _excluded(func, reason: str):
    return unittest.skip(f"excluded, see tests/compat/EXCLUDED_EXECUTOR.md: {reason}")(func)


def build(classes: dict[str, type], version: str, patches, exclusions,
          already: dict[str, set[str]]) -> dict[str, type]:
    """shmpool's copy of each generated class; a test whose name is in
    ``already[generated name]`` (run from another source) is left out."""
    loader = unittest.TestLoader()
    mixins: dict[type, type] = {}
    built = {}
    for generated_name, generated in sorted(classes.items()):
        test_mixin, stdlib_mixin, *rest = generated.__bases__
        if stdlib_mixin not in mixins:
            mixins[stdlib_mixin] = _shmpool_mixin(stdlib_mixin, patches)
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
                attrs[test_name] = _excluded(getattr(generated, test_name), reason)
        name = f"{generated_name}_py{version.replace('.', '')}"
        attrs.update(__module__=__name__, __qualname__=name)
        built[name] = type(name, (test_mixin, mixins[stdlib_mixin], *rest), attrs)
        already.setdefault(generated_name, set()).update(kept)
    return built


EXCLUSIONS = read_exclusions()
SOURCES, MISSING = plan()
LOADED: dict[str, list] = {}            # version -> modules
IMPORT_ERRORS: dict[str, str] = {}      # module name -> error
TEST_CASES: dict[str, type] = {}


def _build_all() -> None:
    already: dict[str, set[str]] = {}
    for source, name in SOURCES:
        modules, failed = load(source, name)
        LOADED[source.version] = modules
        IMPORT_ERRORS.update(failed)
    patches = _patches([m for modules in LOADED.values() for m in modules])
    for source, _ in SOURCES:
        TEST_CASES.update(build(generated_classes(LOADED[source.version]), source.version,
                                patches, EXCLUSIONS, already))


_build_all()
# Module attributes, so pickle finds the classes by name in any process.
globals().update(TEST_CASES)
