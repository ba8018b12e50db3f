"""The mamba2d model zoo: a manifest of checkpoints, sha256-verified files, safe reading, converters from VMamba's
layouts, and the entries as timm pretrained tags.

    import mamba2d.zoo as zoo
    zoo.list()                                   # entry names, `arch.tag`
    model = zoo.load("vmamba2d_nano.digits")     # model with verified weights, eval mode
    timm.create_model("vmamba2d_nano.digits", pretrained=True)   # the same through timm's route
    zoo.check_file("vssm1_tiny_0230s_ckpt_epoch_264.pth")        # self-check of a downloaded file

Modules: `registry` (the manifest), `files` (cache, download, sha256), `convert` (layouts, strict loading),
`build` (models with weights, the self-check), `timm_glue` (the entries as timm tags); `mamba2d.cli.zoo` is the
`mamba2d zoo` command.
Every function takes `manifest=`, a `Manifest` of your own; the default is the shipped one.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoints import (
    UNVERIFIED,
    CheckpointHashMismatch,
    CheckpointMismatch,
    check_state_dict,
    read_checkpoint,
    sha256sum,
)
from .build import FileCheck, check_file, infer_backbone_arch, load, load_state_dict, load_weights
from .convert import (
    convert_mmengine_dense,
    convert_vmamba_classification,
    detect_layout,
    load_into,
    read_model_weights,
)
from .files import HOME_ENV, OFFLINE_ENV, Verification, export, home
from .files import fetch as _fetch
from .files import verify as _verify
from .registry import Entry, Manifest, ZooError, ZooFileMissing, ZooHashMismatch, shipped_manifest, zoo_dir
from .timm_glue import register_with_timm

__all__ = [
    "CheckpointHashMismatch", "CheckpointMismatch", "Entry", "FileCheck", "HOME_ENV", "Manifest", "OFFLINE_ENV",
    "UNVERIFIED", "Verification",
    "ZooError", "ZooFileMissing", "ZooHashMismatch", "check_file", "check_state_dict", "convert_mmengine_dense",
    "convert_vmamba_classification", "detect_layout", "export", "fetch", "get", "home", "infer_backbone_arch",
    "is_entry", "list", "load", "load_into", "load_state_dict", "load_weights", "read_checkpoint",
    "read_model_weights", "register_with_timm", "sha256sum", "verify", "zoo_dir",
]


def list(pattern: str = "*", manifest: Manifest | None = None) -> list[str]:  # noqa: A001 (timm.list_models' verb)
    """Names of the entries matching the shell-style `pattern`, in manifest order.

    Args:
        pattern: e.g. 'vmamba2d_*'.
        manifest: Default: the shipped one.
    """
    return (manifest or shipped_manifest()).names(pattern)


def get(name: str, manifest: Manifest | None = None) -> Entry:
    """The entry `name` (ZooError listing the known names otherwise).

    Args:
        name: `arch.tag`.
        manifest: Default: the shipped one.
    """
    return (manifest or shipped_manifest()).get(name)


def is_entry(name: str, manifest: Manifest | None = None) -> bool:
    """Whether `name` is an entry of the manifest.

    Args:
        name: `arch.tag`.
        manifest: Default: the shipped one.
    """
    return name in (manifest or shipped_manifest()).entries


def fetch(name: str, force: bool = False, manifest: Manifest | None = None) -> Path:
    """Make the entry's file present locally (downloading its URL if needed) and return its verified path.

    Args:
        name: `arch.tag`.
        force: Download again even if present.
        manifest: Default: the shipped one.
    """
    manifest = manifest or shipped_manifest()
    return _fetch(manifest.get(name), manifest, force)


def verify(name: str, manifest: Manifest | None = None) -> Verification:
    """Hash the entry's local file and compare it with the manifest (no download).

    Args:
        name: `arch.tag`.
        manifest: Default: the shipped one.
    """
    manifest = manifest or shipped_manifest()
    return _verify(manifest.get(name), manifest)


register_with_timm(shipped_manifest())
