"""Where the data folders shipped beside the code live: `cuda_ops/` and `zoo/` at the repository root.

A wheel or an editable install maps them to the packages `mamba2d._cuda_ops` and `mamba2d._zoo`; a checkout used
straight from `src/` (PYTHONPATH=src, as on a device machine) has only the repository folders.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

_REPOSITORY = Path(__file__).resolve().parents[2]


def resource_dir(package: str, folder: str, marker: str) -> Path:
    """The repository's `folder` beside this source tree if it holds `marker` (a checkout, used installed in editable
    mode or from src/), else the installed `package`'s folder (a wheel). The checkout wins so that code and data come
    from the same tree even when another checkout is installed.

    Args:
        package: The package the folder is installed as (e.g. `mamba2d._zoo`).
        folder: The folder's name at the repository root (e.g. `zoo`).
        marker: A file that the right folder holds (e.g. `manifest.yaml`).

    Raises:
        FileNotFoundError: Neither folder holds `marker`.
    """
    checkout = _REPOSITORY / folder
    if (checkout / marker).is_file():
        return checkout
    try:
        installed = Path(str(files(package)))
        if (installed / marker).is_file():
            return installed
    except (ModuleNotFoundError, TypeError):
        pass
    raise FileNotFoundError(
        f"mamba2d: {marker} not found at {checkout} nor in the installed package {package}; reinstall mamba2d"
    )
