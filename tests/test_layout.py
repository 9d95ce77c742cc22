"""The layout's rules: floors (data → models → util → main.py → benchmarks), no import
cycles, and no module over about 500 lines without its docstring saying why."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

#: Each package and what it may import from the project (its own floor and those below).
FLOORS = {
    "data": {"data"},
    "models": {"data", "models"},
    "util": {"data", "models", "util"},
    "main": {"data", "models", "util"},
    "benchmarks": {"data", "models", "util", "main", "benchmarks", "tests"},
}
PROJECT = {"data", "models", "util", "main", "benchmarks", "tests"}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {"main": ROOT / "main.py"}
    for package in ("data", "models", "util", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, name: str) -> set[str]:
    """Project modules ``path`` imports (at any depth: lazy imports count as arrows too)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in out if m.split(".")[0] in PROJECT}


def test_no_import_runs_back_up_a_floor() -> None:
    wrong = []
    for name, path in _modules().items():
        allowed = FLOORS[name.split(".")[0]]
        for target in sorted(_imports(path, name)):
            if target.split(".")[0] not in allowed:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {
        name: {t for t in _imports(path, name) if t in modules and t != name}
        for name, path in modules.items()
    }
    # a package's __init__ re-exporting its own modules is not a cycle between them
    graph = {n: {t for t in ts if not n.startswith(f"{t}.")} for n, ts in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_long_modules_say_why_they_are_long() -> None:
    unexplained = []
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "lines" not in doc:
            unexplained.append(f"{name}: {lines} lines")
    assert not unexplained, unexplained
