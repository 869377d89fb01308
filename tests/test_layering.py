"""The core library stays free of Flower: it must run where only torch, numpy and pandas are
installed (a GPU box timing the teacher, a notebook), and the brief makes it a rule."""

import ast
from pathlib import Path

import pytest

CORE = sorted((Path(__file__).resolve().parents[1] / "fedkd").glob("*.py"))


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_module_imports_no_flower(path):
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m == "flwr" or m.startswith("flwr.")], f"{path.name} imports Flower"


def test_there_are_core_modules_to_check():
    assert len(CORE) > 20


def _imports(folder: str) -> set[str]:
    out = set()
    for path in (Path(__file__).resolve().parents[1] / folder).rglob("*.py"):
        tree = ast.parse(path.read_text())
        out |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        out |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    return out


def test_neither_app_imports_the_other():
    """The message format lives in wire/, which both apps import; neither app depends on the other."""
    assert not [m for m in _imports("server") if m == "clients" or m.startswith("clients.")]
    assert not [m for m in _imports("clients") if m == "server" or m.startswith("server.")]
    assert "wire" in _imports("server") and "wire" in _imports("clients")
