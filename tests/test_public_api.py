"""The public surface: exact exports, and the layers of DESIGN.md kept."""

import ast
import pathlib

import shmpool

PACKAGE = pathlib.Path(shmpool.__file__).parent

#: Each module may import only modules listed after it (lower layers).
LAYERS = ["_context", "_queue", "_pool", "_executor", "_supervisor", "_worker", "_protocol", "_default_store", "_serialization", "_store", "_liveness", "_allocator", "_arena",
          "_posix", "_records", "_errors"]


def test_all_is_exact_and_importable():
    assert sorted(shmpool.__all__) == sorted(set(shmpool.__all__))
    for name in shmpool.__all__:
        assert getattr(shmpool, name) is not None
    public = {n for n in vars(shmpool) if not n.startswith("_")}
    assert public - {"testing"} == set(shmpool.__all__)


def test_no_private_names_exported():
    assert not [n for n in shmpool.__all__ if n.startswith("_")]


def _shmpool_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module)
            else:
                found.update(alias.name for alias in node.names)
    return found


def _external_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_modules_import_only_lower_layers():
    for i, module in enumerate(LAYERS):
        upward = _shmpool_imports(module) - set(LAYERS[i + 1:])
        assert not upward, f"{module} imports {upward}, which are not below it"


def test_only_posix_loads_c_libraries():
    loaders = ("CDLL(", "PyDLL(", "find_library(")
    users = {p.stem for p in PACKAGE.glob("*.py")
             if any(loader in p.read_text() for loader in loaders)}
    assert users == {"_posix"}
