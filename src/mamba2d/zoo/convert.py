"""Converters from the checkpoint layouts the zoo knows to our models' state dicts, and strict loading.

Layouts:
- `vmamba-classification`: VMamba's classification checkpoint, a dict whose key `model` holds the state dict with
  the names our VSSM uses (VMamba v2: patch_embed.0/2/5/7, layers.i.blocks.j.*, layers.i.downsample.1/3,
  classifier.norm/head).
- `mmengine-dense`: an mmengine (mmseg / mmdet) checkpoint, `state_dict` holding `backbone.*` (the VSSM with its
  per-stage norms outnorm0..3 and no classifier) and the heads (`decode_head.*`, `neck.*`, ...). The backbone part
  is converted; the head tensors are returned separately and reported, not silently dropped.
- `lightning`: a checkpoint of a mamba2d task, `state_dict` holding `model.*` (and EMA copies, reported).
- `mamba2d`: a state dict of our model as is (what `export` writes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..checkpoints import check_state_dict, read_checkpoint
from .registry import Entry, ZooError

__all__ = ["convert", "convert_mmengine_dense", "convert_vmamba_classification", "detect_layout", "load_into",
           "read_model_weights", "split_weights"]

logger = logging.getLogger(__name__)


def _tensor_dict(mapping: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    bad = [k for k, v in mapping.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ZooError(f"{where}: entries {bad[:5]} are not tensors; this is not a state dict")
    return dict(mapping)


def convert_vmamba_classification(checkpoint: Mapping[str, Any], key: str = "model") -> dict[str, torch.Tensor]:
    """VMamba classification checkpoint ({'model': state_dict, ...}) -> our VSSM state dict (names are shared).

    Args:
        checkpoint: The file as `read_checkpoint` returns it.
        key: Which state dict to take ('model_ema' for EMA weights).
    """
    if key not in checkpoint:
        raise ZooError(
            f"VMamba classification checkpoint: no key {key!r}; it has {sorted(checkpoint)}. Pass key= one of them "
            "(e.g. 'model_ema' for EMA weights)"
        )
    return _tensor_dict(checkpoint[key], f"VMamba classification checkpoint[{key!r}]")


def convert_mmengine_dense(
    checkpoint: Mapping[str, Any], prefix: str = "backbone."
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """mmengine checkpoint ({'meta': ..., 'state_dict': {...}}) -> (backbone state dict, the other tensors).

    The backbone keys lose `prefix` and keep VMamba's names, outnorm0..3 included. Head and neck tensors are returned
    as the second dict for the caller to load into its heads or report.

    Args:
        checkpoint: The file as `read_checkpoint` returns it.
        prefix: The model's key prefix ('model.' for a mamba2d Lightning checkpoint).
    """
    if "state_dict" not in checkpoint:
        raise ZooError(f"mmengine checkpoint: no key 'state_dict'; it has {sorted(checkpoint)}")
    state = _tensor_dict(checkpoint["state_dict"], "mmengine checkpoint['state_dict']")
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not backbone:
        raise ZooError(f"mmengine checkpoint: no key starts with {prefix!r}; first keys: {[*state][:5]}")
    others = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return backbone, others


def detect_layout(checkpoint: Mapping[str, Any], source: str) -> str:
    """The layout of a checkpoint read by `read_checkpoint`, from its keys; ZooError naming the file and its
    top-level keys for a layout the zoo does not know.

    `vmamba-classification`: a mapping under `model`. `mmengine-dense`: `state_dict` with `backbone.*` keys.
    `lightning`: `state_dict` with `model.*` keys (a mamba2d task's checkpoint). `mamba2d`: a plain state dict.

    Args:
        checkpoint: The file as `read_checkpoint` returns it.
        source: The file, for the message.
    """
    if isinstance(checkpoint.get("model"), Mapping):
        return "vmamba-classification"
    state = checkpoint.get("state_dict")
    if isinstance(state, Mapping):
        for prefix, layout in (("backbone.", "mmengine-dense"), ("model.", "lightning")):
            if any(str(k).startswith(prefix) for k in state):
                return layout
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return "mamba2d"
    keys = sorted(map(str, checkpoint))
    raise ZooError(
        f"{source}: unknown checkpoint layout (top-level keys: {keys[:10]}{' ...' if len(keys) > 10 else ''}). "
        "Known: a VMamba classification checkpoint ({'model': state_dict}), an mmengine dense checkpoint "
        "({'state_dict': {'backbone.*', ...}}), a mamba2d Lightning checkpoint ({'state_dict': {'model.*', ...}}) "
        "or a plain state dict of tensors"
    )


def split_weights(checkpoint: Mapping[str, Any], layout: str, source: str
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model weights, other tensors that are not the model's) of a checkpoint in `layout`.

    Args:
        checkpoint: The file as `read_checkpoint` returns it.
        layout: One of the layouts in this module's docstring.
        source: What the checkpoint is, for messages.
    """
    if layout == "vmamba-classification":
        return convert_vmamba_classification(checkpoint), {}
    if layout in ("mmengine-dense", "lightning"):
        return convert_mmengine_dense(checkpoint, prefix="backbone." if layout == "mmengine-dense" else "model.")
    return _tensor_dict(checkpoint, source), {}


def _report(others: Mapping[str, torch.Tensor], source: str) -> None:
    if others:
        logger.warning("%s: %d tensors that are not model weights (%s) are not loaded", source, len(others),
                       ", ".join(sorted({k.split(".", 1)[0] for k in others})))


def convert(entry: Entry, checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of `entry` from its raw checkpoint, by the entry's layout (other tensors reported).

    Args:
        entry: The manifest entry.
        checkpoint: The file as `read_checkpoint` returns it.
    """
    weights, others = split_weights(checkpoint, entry.layout, f"zoo entry {entry.name!r}")
    _report(others, entry.name)
    return weights


def read_model_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """Our model's state dict from a checkpoint in any layout the zoo knows, detected from its keys.

    Plain state dict or safetensors (`mamba2d`); VMamba classification (`model`); mmengine dense (`state_dict` with
    `backbone.*`, heads reported); a Lightning checkpoint of a mamba2d task (`state_dict` with `model.*`, the
    task's other tensors such as EMA copies reported).

    Args:
        path: The checkpoint file.
    """
    checkpoint = read_checkpoint(path)
    weights, others = split_weights(checkpoint, detect_layout(checkpoint, str(path)), str(path))
    _report(others, str(path))
    return weights


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
              missing_ok: Iterable[str] = ()) -> nn.Module:
    """Strictly load `state_dict` into `model` (or into the backbone of a timm features_only wrapper).

    Args:
        model: The model.
        state_dict: The weights.
        source: What the weights are, for messages.
        missing_ok: Model keys the weights may lack.
    """
    target = model.model if hasattr(model, "feature_info") and isinstance(getattr(model, "model", None), nn.Module) \
        else model
    missing_ok = tuple(missing_ok)
    check_state_dict(target, state_dict, source, missing_ok)
    target.load_state_dict(state_dict, strict=not missing_ok)
    return model

