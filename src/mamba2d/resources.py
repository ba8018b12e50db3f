"""Where the data folders shipped beside the code live: `cuda_ops/` and `zoo/` at the repository root.

A wheel or an editable install maps them to the packages `mamba2d._cuda_ops` and `mamba2d._zoo`; a checkout used
straight from `src/` (PYTHONPATH=src, as on a device machine) has only the repository folders.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

_REPOSITORY = Path(__file__).resolve().parents[2]


def resource_dir(package: str, folder: str, marker: str) -> Path:
    """The installed `package`'s folder if it holds `marker`, else the repository's `folder`; loud when neither."""
    try:
        installed = Path(str(files(package)))
        if (installed / marker).is_file():
            return installed
    except (ModuleNotFoundError, TypeError):
        pass
    checkout = _REPOSITORY / folder
    if (checkout / marker).is_file():
        return checkout
    raise FileNotFoundError(
        f"mamba2d: {marker} not found in the installed package {package} nor at {checkout}; reinstall mamba2d"
    )
