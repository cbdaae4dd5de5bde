"""The package's layers only point down: settings at the bottom import nothing of ours, registries and building
blocks above them, the loop and the commands on top. Read from the source (every import at any depth, function-level
ones included), so an upward import fails here before it can hide behind a lazy `import` inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gptmini"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 50


def module_files(package: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is it a package's __init__)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name (and `from X import name` as X.name) an import anywhere in `tree` refers to, with
    relative imports resolved."""
    base = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                source = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (the longest existing prefix of each imported name, so
    `from gptmini.attention import build_attention` points at gptmini.attention, its package)."""
    modules = module_files(package)
    root = package.name

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = {owner(name) for name in imported_names(tree, module, is_package) if name.split(".")[0] == root}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, colouring the modules on the path)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_settings_import_nothing_of_ours():
    """gptmini.config (a package: the dataclasses, and `values` under them) is the bottom layer: the valid values
    live there, checks needing a registry live above (gptmini.config_checks)."""
    graph = import_graph()

    def in_config(module: str) -> bool:
        return module == "gptmini.config" or module.startswith("gptmini.config.")

    layer = [module for module in graph if in_config(module)]
    assert "gptmini.config" in layer
    outside = {module: sorted(t for t in graph[module] if not in_config(t)) for module in layer}
    assert not any(outside.values()), outside


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The walk itself: an import inside a function and a relative one both count, so a planted circle shows."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from pkg.high import g\n")
    (pkg / "high.py").write_text("from .sub import leaf\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("from ..low import f\n")
    graph = import_graph(pkg)
    assert graph["pkg.low"] == {"pkg.high"} and graph["pkg.high"] == {"pkg.sub", "pkg.sub.leaf"}
    assert graph["pkg.sub.leaf"] == {"pkg.low"}
    assert find_cycle(graph) == ["pkg.high", "pkg.sub.leaf", "pkg.low", "pkg.high"]
    (pkg / "low.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(pkg)) is None


def test_modules_and_functions_stay_small():
    """No file of gptmini/ over 400 lines, no function over 50: a file or function that grows past that has
    taken on a second job."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name = path.relative_to(PACKAGE.parent)
        if len(source.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "; ".join(too_long)
