"""The docs build runs every Python example on its pages and fails on one
that errors or does not print what its comments promise."""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def run_example(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "docs" / "_ext"))
    import run_examples
    return lambda code: run_examples.run_example(code, str(ROOT))


def test_an_example_that_prints_what_it_promises_passes(run_example):
    assert run_example("import shmpool\nprint(shmpool.__name__)   # shmpool\n") is None


def test_an_example_that_prints_something_else_fails(run_example):
    problem = run_example("print(1 + 1)   # 3\n")
    assert problem is not None and "did not print ['3']" in problem


def test_an_example_that_raises_fails(run_example):
    problem = run_example("raise SystemExit('no')\n")
    assert problem is not None and "exited with 1" in problem and "no" in problem


def test_examples_import_the_source_trees_shmpool(run_example):
    code = f"import shmpool\nprint(shmpool.__file__.startswith({str(ROOT)!r}))   # True\n"
    assert run_example(code) is None
