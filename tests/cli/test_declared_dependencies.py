"""Every package imported under src/ is declared in pyproject.toml (a dependency or an optional extra)."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
# Distributions of optional extras that a CPU test machine need not have installed, by the module they provide.
NOT_INSTALLED = {"cupy": ("cupy-cuda12x", "cupy-cuda13x"), "cupy_backends": ("cupy-cuda12x", "cupy-cuda13x"),
                 "openslide": ("openslide-python",), "pycocotools": ("pycocotools",), "fvcore": ("fvcore",)}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(root: Path) -> set[str]:
    modules = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "mamba2d"}


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values()
                                                for r in extra)]
    return {_normalise(re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0]) for r in requirements}


def undeclared(modules: set[str], names: set[str]) -> dict[str, list[str]]:
    providers = packages_distributions()
    missing = {}
    for module in sorted(modules):
        dists = providers.get(module) or NOT_INSTALLED.get(module) or [module]
        if not any(_normalise(d) in names for d in dists):
            missing[module] = sorted(dists)
    return missing


def test_every_import_of_src_is_declared():
    modules = imported_modules(ROOT / "src" / "mamba2d")
    assert {"torch", "numpy", "tqdm", "PIL"} <= modules
    assert undeclared(modules, declared()) == {}


def test_the_check_catches_an_undeclared_import():
    names = declared() - {"tqdm"}
    assert undeclared({"tqdm", "numpy"}, names) == {"tqdm": ["tqdm"]}
