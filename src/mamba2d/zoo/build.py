"""Models with the zoo's weights: `load` and `load_weights`, and the converter self-check `check_file`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn

from ..checkpoints import UNVERIFIED, listing, mismatches, read_checkpoint, sha256sum
from ..models.mil import MIL_MODELS, create_mil_model
from ..models.vmamba import MODEL_SIZES
from .convert import convert, detect_layout, load_into, read_model_weights, split_weights
from .files import fetch
from .registry import Entry, Manifest, ZooError, shipped_manifest
from .timm_glue import pretrained_cfg

__all__ = ["FileCheck", "check_file", "infer_backbone_arch", "load", "load_state_dict", "load_weights"]


def load_state_dict(name: str, manifest: Manifest | None = None) -> dict[str, torch.Tensor]:
    """Fetch (if needed), verify and convert the weights of entry `name` into our model's state dict.

    Args:
        name: The entry.
        manifest: The manifest it is in (default: the shipped one).
    """
    manifest = manifest or shipped_manifest()
    entry = manifest.get(name)
    return convert(entry, read_checkpoint(fetch(entry, manifest)))


def load_weights(model: nn.Module, source: str, manifest: Manifest | None = None) -> nn.Module:
    """Strictly load into `model` the weights of `source`: a zoo entry name, else a checkpoint file in any layout
    `read_model_weights` knows. Fails loudly (CheckpointMismatch, ZooError) and never half-loads.

    Args:
        model: The model.
        source: A zoo entry name or a file.
        manifest: The manifest entries are looked up in (default: the shipped one).
    """
    manifest = manifest or shipped_manifest()
    if source in manifest.entries:
        return load_into(model, load_state_dict(source, manifest), f"zoo entry {source!r}",
                         manifest.get(source).missing_ok)
    if not Path(source).is_file():
        raise ZooError(f"weights {source!r} is neither a zoo entry (mamba2d zoo list) nor an existing file")
    return load_into(model, read_model_weights(source), source)


def load(name: str, arch: str | None = None, manifest: Manifest | None = None, **kwargs) -> nn.Module:
    """Model of entry `name` with its verified weights, in eval mode.

    Backbones go through timm's pretrained route (the entry's cfg, its file fetched and sha256-checked first; see
    `VSSM.load_pretrained` for what a load accepts); MIL models are built by name and loaded strictly.

    Args:
        name: The entry.
        arch: Another architecture with the same parameter layout (e.g. a VMamba checkpoint into
            `vmamba2d_tiny`); the entry's metrics then no longer apply.
        manifest: The manifest it is in (default: the shipped one).
        **kwargs: Override the entry's model kwargs (e.g. features_only=True).
    """
    manifest = manifest or shipped_manifest()
    entry = manifest.get(name)
    model_kwargs = {**entry.kwargs, **kwargs}
    if entry.task == "mil":
        model = create_mil_model(arch or entry.arch, **model_kwargs)
        return load_weights(model, name, manifest).eval()
    cfg = pretrained_cfg(entry, fetch(entry, manifest))
    return timm.create_model(arch or entry.arch, pretrained=True, pretrained_cfg=cfg, **model_kwargs).eval()


def infer_backbone_arch(state_dict: Mapping[str, torch.Tensor], source: str) -> str:
    """`vmamba_<size>` whose dims, depths and SS2D width a VSSM state dict has (the scan, 1D or 2D, leaves no trace
    in the weights: the same file loads into `vmamba2d_<size>`).

    Args:
        state_dict: The weights.
        source: What they are, for messages.
    """
    if "patch_embed.5.weight" not in state_dict:
        raise ZooError(f"{source}: not a VMamba / 2DVMamba backbone (no patch_embed.5.weight); pass the arch")
    depths = []
    while any(k.startswith(f"layers.{len(depths)}.blocks.") for k in state_dict):
        i = len(depths)
        depths.append(len({k.split(".")[3] for k in state_dict if k.startswith(f"layers.{i}.blocks.")}))
    dim = state_dict["patch_embed.5.weight"].shape[0]
    inner = state_dict["layers.0.blocks.0.op.in_proj.weight"].shape[0] if depths else 0
    for size, cfg in MODEL_SIZES.items():
        if (cfg["dims"], tuple(cfg["depths"]), cfg["ssm_ratio"]) == (dim, tuple(depths), inner / dim):
            return f"vmamba_{size}"
    raise ZooError(f"{source}: a VSSM with dims[0]={dim}, depths={tuple(depths)}, SS2D width {inner} matches no "
                   f"registered size ({', '.join(MODEL_SIZES)}); pass the arch")


@dataclass(frozen=True)
class FileCheck:
    """What `check_file` found: the file's identity, how it loads and what to compare its model with.

    Args:
        path: The file.
        sha256: Its sha256.
        layout: The layout detected.
        arch: The model it was loaded into.
        entry: The manifest entry it is (by sha256, else by file name), or None.
        missing: Model keys the file lacks.
        unexpected: File keys the model lacks.
        shapes: Keys whose shapes differ.
        not_loaded: Tensors outside the model (heads, EMA copies).
        norm_eps: The eps of the model's normalisation layers.
    """

    path: Path
    sha256: str
    layout: str
    arch: str
    entry: Entry | None
    missing: list[str]
    unexpected: list[str]
    shapes: list[str]
    not_loaded: list[str]
    norm_eps: list[float]

    @property
    def hash_ok(self) -> bool:
        """Whether the sha256 matches the entry's (true for a file outside the zoo or an entry without a hash)."""
        return self.entry is None or not self.entry.sha256 or self.entry.sha256 == self.sha256

    @property
    def ok(self) -> bool:
        """Whether the hash matches and the strict load found no missing, unexpected or wrongly shaped key."""
        return self.hash_ok and not (self.missing or self.unexpected or self.shapes)

    def describe(self) -> str:
        """A readable report for the zoo's verify command: one labelled line per finding, the verdict last."""
        entry = self.entry
        if entry is None:
            identity = "not in the zoo's manifest"
        elif not entry.sha256:
            identity = f"file of zoo entry {entry.name} ({UNVERIFIED}: confirm this hash with the publisher)"
        else:
            identity = f"zoo entry {entry.name}: " + ("matches the manifest" if self.hash_ok else
                                                      f"DIFFERS from the manifest's {entry.sha256}")
        loads = [listing(what, items) for what, items in (
            ("missing keys", self.missing), ("unexpected keys", self.unexpected), ("shape mismatches", self.shapes))
            if items]
        metrics = {k: v for k, v in entry.metrics.items() if k != "data"} if entry else {}
        compare = (f"{', '.join(f'{k} {v}' for k, v in metrics.items())} on {entry.metrics.get('data', '?')}"
                   if metrics else "nothing published in the manifest")
        lines = [
            f"file        {self.path}",
            f"sha256      {self.sha256} ({identity})",
            f"layout      {self.layout}",
            f"model       {self.arch}",
            "strict load " + ("OK: every key and shape matches" if not loads else "FAILED: " + "; ".join(loads)),
        ]
        if self.not_loaded:
            outside = listing("tensors outside the model (heads, EMA copies, ...)", self.not_loaded, 6)
            lines.append(f"not loaded  {outside}")
        lines += [
            f"norm eps    {', '.join(f'{e:g}' for e in self.norm_eps) or 'no normalisation layers'}",
            f"compare     {compare}",
            f"result      {'OK' if self.ok else 'FAILED'}",
        ]
        return "\n".join(lines)


def check_file(path: Path | str, arch: str | None = None, manifest: Manifest | None = None) -> FileCheck:
    """Converter self-check of a checkpoint file, e.g. an official one just downloaded.

    Detects the layout (ZooError on one the zoo does not know), converts it, builds the model (the zoo entry's arch
    and kwargs when the file is an entry's, else `arch`, else the VMamba size its shapes give) and loads it
    strictly, and reports the sha256 against the manifest, every missing / unexpected / wrongly shaped key, the
    tensors left out, the eps of the model's norms and the published metrics to compare an evaluation with.

    Args:
        path: The checkpoint file (safetensors or a torch checkpoint, read without unpickling code).
        arch: The architecture to load into; overrides the manifest's (e.g. `vmamba2d_tiny` for a VMamba file).
        manifest: The manifest to identify the file in (default: the shipped one).
    """
    manifest = manifest or shipped_manifest()
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"{path}: no such file")
    sha256 = sha256sum(path)
    entry = manifest.for_file(path, sha256)
    checkpoint = read_checkpoint(path, verify=False)  # the hash is reported below, not raised
    layout = detect_layout(checkpoint, str(path))
    state, others = split_weights(checkpoint, layout, str(path))
    dense = any(k.startswith("outnorm") for k in state)
    arch = arch or (entry.arch if entry else infer_backbone_arch(state, str(path)))
    kwargs = dict(entry.kwargs) if entry else {}
    missing_ok = entry.missing_ok if entry else ()
    if arch in MIL_MODELS:
        if not entry:
            raise ZooError(f"{path}: a MIL model's kwargs are not in the file; check it as a zoo entry")
        model = create_mil_model(arch, **kwargs)
    else:
        if not entry:
            head = state.get("classifier.head.weight")
            kwargs = {"features_only": True} if dense else {"num_classes": head.shape[0] if head is not None else 0}
            missing_ok = ("classifier.norm.weight", "classifier.norm.bias") if dense else ()
        model = timm.create_model(arch, **kwargs)
    target = model.model if kwargs.get("features_only") else model
    missing, unexpected, shapes = mismatches(target, state, missing_ok)
    if not (missing or unexpected or shapes):
        target.load_state_dict(state, strict=not missing_ok)
    norm_eps = sorted({float(m.eps) for m in model.modules() if isinstance(getattr(m, "eps", None), float)})
    return FileCheck(path, sha256, layout, arch, entry, missing, unexpected, shapes, sorted(others), norm_eps)
