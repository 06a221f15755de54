"""Sphinx configuration of shmpool's documentation.

Build: ``tox -e docs`` (what CI runs), or
``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
Every Python example on a page runs during the build (``_ext/run_examples.py``).
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

import shmpool  # noqa: E402

project = "shmpool"
author = "the shmpool developers"
copyright = "the shmpool developers"
release = version = shmpool.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "run_examples",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

# The API reference: docstrings are Google style (Args:, Returns:, Raises:).
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# No inventory is fetched (the build needs no network): names from the
# standard library stay plain text.
intersphinx_mapping = {}
nitpicky = False

html_theme = "pydata_sphinx_theme"
html_title = f"shmpool {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_static_path: list[str] = []
