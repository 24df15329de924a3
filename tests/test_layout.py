"""Imports run one way, jobs -> tune -> vae: the library never imports the sweep or the jobs."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found |= {(path.name, n.split(".")[0]) for n in names}
    return found


def test_the_library_imports_neither_the_sweep_nor_the_jobs():
    assert [(f, m) for f, m in _imports("vae") if m in ("tune", "jobs")] == []


def test_the_sweep_does_not_import_the_jobs():
    assert [(f, m) for f, m in _imports("tune") if m == "jobs"] == []


# What is worth keeping out of argument parsing and of reading results: an import inside a function must
# load one of these (directly, or through a project module that imports one at its top), or say why.
HEAVY = {"torch", "torchvision", "ray", "matplotlib", "sklearn", "mlflow"}


def _module_path(name: str) -> Path | None:
    path = ROOT / (name.replace(".", "/") + ".py")
    package = ROOT / name.replace(".", "/") / "__init__.py"
    return path if path.exists() else package if package.exists() else None


def _absolute(node: ast.ImportFrom, path: Path) -> list[str]:
    if node.level == 0:  # `from vae.model import kernels` imports vae.model.kernels
        return [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-node.level])
    base = f"{package}.{node.module}" if node.module else package
    return [base] if node.module else [f"{base}.{a.name}" for a in node.names]


def _top_imports(path: Path) -> list[str]:
    out = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += _absolute(node, path)
    return out


def _heavy(name: str, seen: set[str]) -> bool:
    if name.split(".")[0] in HEAVY:
        return True
    path = _module_path(name)
    if path is None or name in seen:
        return False
    seen.add(name)
    return any(_heavy(n, seen) for n in _top_imports(path))


def test_imports_inside_functions_load_something_heavy_or_say_why():
    light = []
    for package in ("vae", "tune", "jobs", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import):
                        names = [a.name for a in inner.names]
                    elif isinstance(inner, ast.ImportFrom):
                        names = _absolute(inner, path)
                    else:
                        continue
                    said = "#" in lines[inner.lineno - 1]
                    if not said and not any(_heavy(n, set()) for n in names):
                        light.append(f"{path.relative_to(ROOT)}:{inner.lineno} {', '.join(names)}")
    assert light == [], "imports inside functions that load nothing heavy: move them to the top, or say why"


def _project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = _absolute(node, path)
        else:
            continue
        found |= {n for n in names if _module_path(n) is not None}
    return found


def test_no_import_circles_even_through_imports_inside_functions():
    graph = {}
    for package in ("vae", "tune", "jobs", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            graph[name] = {n for n in _project_imports(path) if n != name and _module_path(n).name != "__init__.py"}
    cycles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, stack + [node], done)
        done.add(node)

    done: set[str] = set()
    for node in sorted(graph):
        visit(node, [], done)
    assert cycles == []


def test_the_loop_fits_a_screenful_and_no_class_of_the_library_is_a_god_object():
    assert len((ROOT / "vae" / "training" / "loop.py").read_text().splitlines()) <= 300
    long = []
    for path in (ROOT / "vae").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200:
                long.append(f"{path.name}:{node.name}")
    assert long == []


def test_the_math_reads_like_the_formula_with_no_kernel_in_it():
    """losses.py and models.py hold the plain definitions; vae/model/fast.py alone maps them to vae/model/kernels.py."""
    for name in ("losses.py", "models.py"):
        imported = _project_imports(ROOT / "vae" / "model" / name)
        assert not any(n.startswith("vae.model.kernels") or n.startswith("vae.model.fast") for n in imported), name
