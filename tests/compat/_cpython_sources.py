"""Find CPython's ``test_concurrent_futures``, here or in another interpreter.

Not every interpreter ships it: 3.10 has one file
(``Lib/test/test_concurrent_futures.py``), 3.13 a package
(``Lib/test/test_concurrent_futures/``), and the 3.11 and 3.12 builds this
project is tested with have neither.  The executor harness therefore asks
the interpreters themselves where their copy is:

1. the running interpreter (``importlib.util.find_spec``);
2. ``python3.X`` on ``PATH``;
3. ``pyenv exec python3.X`` for every pyenv version 3.X, if pyenv is there.

The answers are cached in the environment variable ``SHMPOOL_CPYTHON_TEST_SOURCES``
(JSON: ``{"3.10": "<origin>" or ""}``) so that worker processes and child
interpreters do not ask again; set it yourself to point at sources
explicitly.

A source from another interpreter is imported under a module name through
``SourceFinder``, a meta path finder: its own files are read in place and
nothing is written next to them (no ``__pycache__``).  Worker processes need
the same finder before they unpickle a task that names a function of those
modules, so the executor given to the tests (``ProcessPoolExecutor`` below)
runs ``prepare_worker`` before the test's own initializer, and a child
interpreter started by a test runs ``setup_child`` first.

This module is imported in every worker process, so it stays light.
"""

from __future__ import annotations

import concurrent.futures
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import shmpool

ENV = "SHMPOOL_CPYTHON_TEST_SOURCES"
CANONICAL = "test.test_concurrent_futures"
ASK_TIMEOUT = 60          # seconds an interpreter may take to answer

_QUERY = (
    "import importlib.util, json, sys\n"
    "spec = importlib.util.find_spec('test.test_concurrent_futures')\n"
    "print(json.dumps(['%d.%d' % sys.version_info[:2], spec.origin if spec else '']))\n"
)


@dataclass(frozen=True)
class Source:
    """Where one CPython version's ``test_concurrent_futures`` lives."""

    version: str          # "3.10"
    origin: str           # the module file, or the package's __init__.py
    native: bool          # the running interpreter's own copy

    @property
    def is_package(self) -> bool:
        return os.path.basename(self.origin) == "__init__.py"

    @property
    def location(self) -> str:
        """The module file, or the package directory."""
        return os.path.dirname(self.origin) if self.is_package else self.origin


def running_version() -> str:
    return "%d.%d" % sys.version_info[:2]


def own_source() -> Source | None:
    """The running interpreter's own copy, if it ships one (looked up in its
    ``test`` package directly: ``SourceFinder`` may serve the name here)."""
    import test
    spec = importlib.machinery.PathFinder.find_spec(CANONICAL, test.__path__)
    if spec is None or not spec.origin:
        return None
    return Source(running_version(), spec.origin, native=True)


def _interpreters(version: str):
    """``(command, environment)`` pairs that may run Python *version*."""
    exe = f"python{version}"
    if shutil.which(exe):
        yield [exe], None
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return
    try:
        listed = subprocess.run([pyenv, "versions", "--bare"], capture_output=True,
                                text=True, timeout=ASK_TIMEOUT, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return
    for name in listed.split():
        if re.fullmatch(re.escape(version) + r"(\.\d+)?", name):
            yield [pyenv, "exec", exe], {**os.environ, "PYENV_VERSION": name}


def _ask(version: str) -> str:
    """The origin of *version*'s copy, asked of the interpreters found; ""
    if none answers with one."""
    for command, env in _interpreters(version):
        try:
            done = subprocess.run([*command, "-c", _QUERY], capture_output=True, text=True,
                                  timeout=ASK_TIMEOUT, env=env, check=False)
            answered, origin = json.loads(done.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            continue
        if answered == version and origin and os.path.exists(origin):
            return origin
    return ""


def find_source(version: str) -> Source | None:
    """*version*'s copy: this interpreter's own, or another interpreter's."""
    if version == running_version():
        return own_source()
    cache = json.loads(os.environ.get(ENV) or "{}")
    if version not in cache:
        cache[version] = _ask(version)
        os.environ[ENV] = json.dumps(cache)       # for workers and child interpreters
    return Source(version, cache[version], native=False) if cache[version] else None


def how_sought(version: str) -> str:
    """The places ``find_source`` looked in, for a skip reason."""
    return (f"asked python{version} on PATH and pyenv's {version}.x versions; "
            f"set {ENV}='{{\"{version}\": \"<path to test_concurrent_futures>\"}}' "
            f"to point at a copy")


# -- importing sources of other interpreters ------------------------------

class _NoCacheLoader(importlib.machinery.SourceFileLoader):
    """Reads the source where it is; writes no bytecode next to it (it may
    be another interpreter's installation)."""

    def set_data(self, path, data, *, _mode=0o666):
        pass


class SourceFinder(importlib.abc.MetaPathFinder):
    """Imports ``alias`` and ``alias.sub...`` from a source's location."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}        # module name -> file or package dir

    def find_spec(self, name, path=None, target=None):
        for alias, location in self.aliases.items():
            if name == alias:
                rest = []
            elif name.startswith(alias + "."):
                rest = name[len(alias) + 1:].split(".")
            else:
                continue
            if not rest and os.path.isfile(location):
                return importlib.util.spec_from_file_location(
                    name, location, loader=_NoCacheLoader(name, location))
            where = os.path.join(location, *rest)
            if os.path.isdir(where):
                # A namespace package: the package's __init__.py (which may
                # use test.support helpers this interpreter lacks) is not run.
                spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
                spec.submodule_search_locations = [where]
                return spec
            if os.path.isfile(where + ".py"):
                return importlib.util.spec_from_file_location(
                    name, where + ".py", loader=_NoCacheLoader(name, where + ".py"))
            return None
        return None


_finder = SourceFinder()


def extend_test_support() -> None:
    """Add to this interpreter's ``test.support`` what newer test sources
    use and it lacks: ``Py_GIL_DISABLED`` and ``requires_gil_enabled`` (the
    GIL is always on here), and the ``thread=`` (TSAN) keyword of the
    sanitizer checks (no TSAN build here).  Only additions: nothing that
    exists changes meaning."""
    from test import support

    if not hasattr(support, "Py_GIL_DISABLED"):
        support.Py_GIL_DISABLED = False
    if not hasattr(support, "requires_gil_enabled"):
        support.requires_gil_enabled = lambda msg="": (lambda func: func)
    check, skip = support.check_sanitizer, support.skip_if_sanitizer
    if "thread" not in inspect.signature(check).parameters:
        def check_sanitizer(*, thread=False, **kinds):
            return any(kinds.values()) and check(**kinds)
        support.check_sanitizer = check_sanitizer
    if "thread" not in inspect.signature(skip).parameters:
        def skip_if_sanitizer(reason=None, *, thread=False, **kinds):
            return skip(reason, **kinds) if any(kinds.values()) else (lambda func: func)
        support.skip_if_sanitizer = skip_if_sanitizer


def install(aliases: dict[str, str]) -> None:
    """Make each module name in *aliases* import from its location, in this
    process (idempotent)."""
    if not aliases:
        return
    extend_test_support()
    _finder.aliases.update(aliases)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def installed_aliases() -> dict[str, str]:
    return dict(_finder.aliases)


class _Later:
    """A value pickled for a worker but unpickled only on ``get()``: after
    ``install``, since it may name functions of the sources (an initializer
    of the test module).  Under fork it is never pickled at all."""

    def __init__(self, value) -> None:
        self._value, self._data = value, None

    def __reduce__(self):
        # Runs while the worker is being started, so multiprocessing objects
        # among the values (a Queue in initargs) may be pickled.
        return _Later._unpickled_later, (bytes(ForkingPickler.dumps(self._value)),)

    @classmethod
    def _unpickled_later(cls, data: bytes) -> "_Later":
        later = cls.__new__(cls)
        later._value, later._data = None, data
        return later

    def get(self):
        if self._data is not None:
            self._value, self._data = pickle.loads(self._data), None
        return self._value


def prepare_worker(aliases: dict[str, str], initializer: _Later) -> None:
    """Worker initializer: the finder first, then the test's own initializer."""
    install(aliases)
    function, args = initializer.get()
    if function is not None:
        function(*args)


class _SourcesInWorkers:
    """An executor whose workers can import the sources this process
    imports through ``SourceFinder``: ``prepare_worker`` runs before the
    test's own initializer."""

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(),
                 **kwargs):
        if initializer is None or callable(initializer):    # else the executor refuses it
            initializer, initargs = prepare_worker, (installed_aliases(),
                                                     _Later((initializer, tuple(initargs))))
        super().__init__(max_workers, mp_context, initializer, initargs, **kwargs)


class ProcessPoolExecutor(_SourcesInWorkers, shmpool.ProcessPoolExecutor):
    """``shmpool.ProcessPoolExecutor``, its workers seeing the sources.
    Everything else is shmpool's; the name is the standard library's, as the
    tests format it into scripts (``from concurrent.futures import
    {executor_type}``)."""


class StdlibProcessPoolExecutor(_SourcesInWorkers, concurrent.futures.ProcessPoolExecutor):
    """The standard library's executor on shmpool's context, its workers
    seeing the sources.  Without ``mp_context`` it takes
    ``shmpool.get_context()`` of the start method the standard library
    would pick (spawn when ``max_tasks_per_child`` is given)."""

    def __init__(self, max_workers=None, mp_context=None, *args, **kwargs):
        if mp_context is None:
            mp_context = shmpool.get_context(
                "spawn" if kwargs.get("max_tasks_per_child") is not None else None)
        super().__init__(max_workers, mp_context, *args, **kwargs)


# The tests format the class's name into scripts, as ProcessPoolExecutor's.
StdlibProcessPoolExecutor.__name__ = "ProcessPoolExecutor"


def setup_child(aliases: dict[str, str], on_context: bool = False) -> None:
    """First lines of a child interpreter's ``-c`` script: the same sources,
    and ``concurrent.futures.ProcessPoolExecutor`` is shmpool's (or,
    *on_context*, the standard library's on shmpool's context)."""
    install(aliases)
    concurrent.futures.ProcessPoolExecutor = (StdlibProcessPoolExecutor if on_context
                                              else ProcessPoolExecutor)
