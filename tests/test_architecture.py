"""The house rules that code review alone would let slip: checked over the package's AST."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cosyvoiced"
MAX_SUPERVISOR_LINES = 300
MAX_CLASS_LINES = 400


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(path, root): path for path in root.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path], root: Path = PACKAGE) -> set[str]:
    """Every package module `path` imports: at the top, in functions, under TYPE_CHECKING,
    absolute or relative. `from package import module` is an edge to that module only; to
    the package's `__init__` only when a name defined there is imported."""
    here = _module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            found.update(_imported_from(node, package, modules))
    return found


def _imported_from(node: ast.ImportFrom, package: str, modules: dict[str, Path]) -> set[str]:
    if node.level:  # relative: one level is this module's own package
        base = package.split(".")
        base = base[:len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        found.add(submodule if submodule in modules else source)
    return found & modules.keys()


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


def _package_circle(root: Path) -> list[str] | None:
    modules = _modules(root)
    return _circle({name: _imports(path, modules, root) - {name}
                    for name, path in modules.items()})


def test_no_import_circle_in_the_package() -> None:
    circle = _package_circle(PACKAGE)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_circle_check_sees_relative_imports_and_package_inits(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "child.py").write_text("from . import other\nfrom .sub import leaf\n")
    (package / "other.py").write_text("VALUE = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "leaf.py").write_text("from .. import other\n")
    assert _package_circle(package) is None  # submodules named through their packages
    (package / "sub" / "__init__.py").write_text("from .leaf import helper\n")
    (package / "sub" / "leaf.py").write_text("from pkg.sub import NAME\n")
    assert set(_package_circle(package) or []) == {"pkg.sub", "pkg.sub.leaf"}
    (package / "sub" / "leaf.py").write_text("")
    (package / "other.py").write_text("from .child import VALUE\n")
    assert set(_package_circle(package) or []) == {"pkg.child", "pkg.other"}


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
