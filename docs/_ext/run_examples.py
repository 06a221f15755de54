"""Run every Python example of the docs while they build.

Each ``python`` code block of a page is written to a file and run as a
script (a file, so that spawn and forkserver children can import it), from
an empty folder, with the interpreter that builds the docs and the shmpool
of the source tree the docs are built from.  A block fails
the build (a warning; the docs build with warnings as errors) when it exits
non-zero, or when a line it promises is not printed: a comment after
``print(...)`` is the exact output of that line, as in the README, whose
examples ``tests/test_readme_examples.py`` runs the same way.

A page can opt a block out with the ``:class: no-run`` option of the
``code-block`` directive; none does today.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:                    # run_example() itself needs no Sphinx (its tests)
    from docutils import nodes
    from sphinx.application import Sphinx

#: Seconds one example may take; reaching it means it hangs.
EXAMPLE_TIMEOUT = 120
_PROMISE = re.compile(r"print\(.*\)\s+#\s*(.+)")


def _normalised(text: str) -> str:
    return " ".join(text.split())


def run_example(code: str, root: str, timeout: float = EXAMPLE_TIMEOUT) -> str | None:
    """Run *code* as a script, importing shmpool from *root* first; None if
    it ran as promised, else what went wrong."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="shmpool-docs-") as folder:
        script = pathlib.Path(folder, "example.py")
        script.write_text(code, encoding="utf-8")
        try:
            done = subprocess.run([sys.executable, str(script)], capture_output=True,
                                  text=True, timeout=timeout, cwd=folder, env=env)
        except subprocess.TimeoutExpired:
            return f"did not finish within {timeout} s"
    if done.returncode != 0:
        return f"exited with {done.returncode}:\n{done.stderr.strip()}"
    printed = {_normalised(line) for line in done.stdout.splitlines()}
    missing = [p for p in _PROMISE.findall(code) if _normalised(p) not in printed]
    if missing:
        return f"did not print {missing!r}; it printed:\n{done.stdout.strip()}"
    return None


def _run_examples(app: Sphinx, doctree: nodes.document) -> None:
    from docutils import nodes
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    root = str(pathlib.Path(app.confdir).parent)
    for block in doctree.findall(nodes.literal_block):
        if block.get("language") not in ("python", "py") or "no-run" in block["classes"]:
            continue
        problem = run_example(block.astext(), root)
        if problem:
            logger.warning("example failed: %s", problem, location=block,
                           type="shmpool", subtype="example")


def setup(app: Sphinx) -> dict:
    app.connect("doctree-read", _run_examples)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
