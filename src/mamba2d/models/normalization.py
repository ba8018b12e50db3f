"""The input normalisation of a backbone: the mean and std of its timm pretrained cfg, the one place every task,
the detector and the slide feature extractor take them from (their batches hold [0, 1] images)."""

from __future__ import annotations

import timm
import torch.nn as nn
from timm.data import resolve_data_config

__all__ = ["input_normalization"]


def input_normalization(model_or_name: nn.Module | str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) that turn [0, 1] images into the input a backbone was trained on.

    A model gives its own `pretrained_cfg` (the tag it was created with, any `pretrained_cfg_overlay` included); a
    name gives the cfg `timm.create_model(name)` would attach (a bare architecture: its default tag). Any timm
    family works. A cfg without both values is an error rather than timm's ImageNet fallback: a library default
    would silently replace the model's own convention.

    Args:
        model_or_name: A timm model (a `features_only` wrapper too), or a timm name with or without a tag.

    Returns:
        (mean, std), one float per input channel.

    Raises:
        ValueError: No pretrained cfg, or one without `mean` and `std`.
    """
    if isinstance(model_or_name, str):
        cfg = timm.models.get_pretrained_cfg(model_or_name)
        cfg = cfg.to_dict() if cfg is not None else {}
        source = f"timm model {model_or_name!r}"
    else:
        cfg = getattr(model_or_name, "pretrained_cfg", None) or {}
        source = f"{type(model_or_name).__name__} ({cfg.get('architecture', 'no architecture')})"
    missing = [key for key in ("mean", "std") if not cfg.get(key)]
    if missing:
        raise ValueError(f"input_normalization: the pretrained cfg of {source} has no {' and '.join(missing)}")
    data = resolve_data_config(pretrained_cfg=cfg)
    return tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
