"""The house rules that code review alone would let slip: checked over the package's AST."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cosyvoiced"
MAX_SUPERVISOR_LINES = 300
MAX_CLASS_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every package module `path` imports: at the top, in functions, under TYPE_CHECKING."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return [*path[path.index(imported):], imported]
            if imported not in state and (found := visit(imported)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_circle_in_the_package() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # A package imports its own modules' names through __init__: not a circle of code.
    graph = {name: {m for m in imported if not name.startswith(f"{m}.")}
             for name, imported in graph.items()}
    circle = _circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_only_the_daemon_imports_the_supervisor() -> None:
    modules = _modules()
    importers = sorted(name for name, path in modules.items()
                       if "cosyvoiced.supervisor" in _imports(path, modules)
                       and name != "cosyvoiced.supervisor")
    assert importers == ["cosyvoiced.daemon"]


def test_the_supervisor_is_short_and_no_class_is_huge() -> None:
    lines = len((PACKAGE / "supervisor.py").read_text().splitlines())
    assert lines <= MAX_SUPERVISOR_LINES, f"supervisor.py has {lines} lines"
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                assert size <= MAX_CLASS_LINES, f"{path.name}: class {node.name}: {size} lines"
