"""What the built wheel ships: py.typed, so that type checkers read
shmpool's annotations (PEP 561)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.wheel
def test_wheel_ships_py_typed(tmp_path):
    # Build from a copy, so that the build leaves nothing in the work tree.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "shmpool", source / "shmpool",
                    ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                           "-w", str(tmp_path / "dist"), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("shmpool-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "shmpool/py.typed" in names
    assert "shmpool/__init__.py" in names
