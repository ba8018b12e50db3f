"""The package's import graph has no cycle and follows the layers of docs/architecture.md.

Imports are read from the source (every `import` and `from ... import`, at module level or inside functions), so
an import hidden in a function to break a cycle still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mamba2d"

# The floors of docs/architecture.md: a module may import its own floor and the floors below.
FLOORS = {
    "mamba2d.resources": 0, "mamba2d.checkpoints": 0, "mamba2d.compat": 0,
    "mamba2d.ops": 1, "mamba2d.data": 1,
    "mamba2d.models": 2,
    "mamba2d.zoo": 3,
    "mamba2d.tasks": 4,
    "mamba2d.wsi": 5, "mamba2d.analysis": 5,
}
FRONT_DOOR = 6  # the package itself, the `mamba2d.cli` package (every command) and `__main__`


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level \
                else node.module
            targets = [f"{base.rstrip('.')}.{alias.name}" for alias in node.names] + [base.rstrip(".")]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("mamba2d") and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # `from . import x` also names the package itself; an import of a submodule is what counts.
    return {name: {t for t in deps if not any(o.startswith(t + ".") for o in deps)} for name, deps in graph.items()}


def floor(module: str) -> int:
    if module in ("mamba2d", "mamba2d.cli", "mamba2d.__main__") or module.startswith("mamba2d.cli."):
        return FRONT_DOOR
    for prefix, level in FLOORS.items():
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"{module} has no floor in docs/architecture.md (tests/test_architecture.py FLOORS)")


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_imports_go_down_the_floors():
    upward = sorted(f"{module} (floor {floor(module)}) imports {dep} (floor {floor(dep)})"
                    for module, deps in _graph().items() for dep in deps if floor(dep) > floor(module))
    assert upward == []


def test_models_do_not_import_the_zoo():
    assert [m for m, deps in _graph().items() if m.startswith("mamba2d.models")
            and any(d.startswith("mamba2d.zoo") for d in deps)] == []
