"""Imports run one way, jobs -> tune -> vae: the library never imports the sweep or the jobs."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found |= {(path.name, n.split(".")[0]) for n in names}
    return found


def test_the_library_imports_neither_the_sweep_nor_the_jobs():
    assert [(f, m) for f, m in _imports("vae") if m in ("tune", "jobs")] == []


def test_the_sweep_does_not_import_the_jobs():
    assert [(f, m) for f, m in _imports("tune") if m == "jobs"] == []
