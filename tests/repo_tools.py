"""Import a script of the repository's tools/ folder (not a package) as a module, for tests of its functions."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> types.ModuleType:
    """The module of `tools/<name>.py`, executed fresh (its `main` does not run).

    Args:
        name: The script's file name without `.py`.
    """
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
