"""The zoo's backbone entries as timm pretrained tags.

`timm.list_pretrained("vmamba*")` lists them, and `timm.create_model("vmamba2d_nano.digits", pretrained=True)` (or
the architecture alone, for its first entry) loads them through timm's own route: each cfg names the entry's local
file (`file`, beside the manifest or in the download cache) and, for downloads, its `url`; `custom_load` makes timm
hand the file to the model's `load_pretrained`, which reads it without unpickling code and checks its sha256 against
the manifest (recorded here with `mamba2d.checkpoints.expect_sha256`). No state dict travels inside a cfg.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from timm.models import PretrainedCfg

from ..checkpoints import expect_sha256
from ..compat import register_timm_pretrained
from .files import local_path
from .registry import Entry, Manifest

__all__ = ["pretrained_cfg", "register_with_timm"]


def pretrained_cfg(entry: Entry, path: Path) -> dict[str, Any]:
    """The timm pretrained cfg of a backbone entry whose file is (or will be) at `path`.

    Args:
        entry: A manifest entry of a timm architecture.
        path: Where its file is.
    """
    base = timm.models.get_pretrained_cfg(entry.arch)
    cfg = base.to_dict() if base is not None else {}
    dense = entry.kwargs.get("features_only", False)
    cfg.update(
        architecture=entry.arch, tag=entry.tag, file=str(path), url=entry.url, custom_load=True,
        license=entry.license,
        num_classes=entry.kwargs.get("num_classes", 0 if dense else cfg.get("num_classes", 1000)),
        description=f"mamba2d zoo entry {entry.name} ({entry.provenance}, {entry.task})",
    )
    if entry.input.get("size"):
        cfg["input_size"] = (entry.kwargs.get("in_chans", 3), entry.input["size"], entry.input["size"])
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if key in entry.input:
            value = entry.input[key]
            cfg[key] = tuple(value) if isinstance(value, list) else value
    return {k: v for k, v in cfg.items() if v is not None}


def register_with_timm(manifest: Manifest) -> None:
    """Register the manifest's backbone entries as timm pretrained tags (the first of an architecture its
    default) and record every entry's sha256 for the checkpoint reader.

    Args:
        manifest: The manifest (the shipped one is registered when `mamba2d.zoo` is imported).
    """
    by_arch: dict[str, list[PretrainedCfg]] = {}
    for entry in manifest.entries.values():
        expect_sha256(entry.filename, entry.sha256)
        if timm.is_model(entry.arch):
            cfg = PretrainedCfg(**pretrained_cfg(entry, local_path(entry, manifest)))
            by_arch.setdefault(entry.arch, []).append(cfg)
    for arch, cfgs in by_arch.items():
        register_timm_pretrained(arch, cfgs)
