"""Whole-slide MIL models by name: 2DMambaMIL and the baselines it is compared with.

`create_mil_model(name, in_dim=..., num_outputs=..., **kwargs)`; every model maps one bag (features (N, D),
positions (N, 2), optional segments (N,)) to `MILOutput(logits, scores)`.
"""

from __future__ import annotations

import torch.nn as nn

from .mil_baselines import ABMIL, GridCNNMIL, MaxPoolMIL, MeanPoolMIL, TransMIL
from .mil_layers import AttentionPool, MILOutput
from .mil_mamba import MambaBlock, MambaMIL1D, MambaMIL2D

__all__ = ["MIL_MODELS", "create_mil_model", "MILOutput", "AttentionPool", "MambaBlock", "MambaMIL2D",
           "MambaMIL1D", "ABMIL", "TransMIL", "MeanPoolMIL", "MaxPoolMIL", "GridCNNMIL"]

MIL_MODELS: dict[str, type[nn.Module]] = {
    "mamba_mil_2d": MambaMIL2D,
    "mamba_mil_1d": MambaMIL1D,
    "abmil": ABMIL,
    "transmil": TransMIL,
    "mean": MeanPoolMIL,
    "max": MaxPoolMIL,
    "grid_cnn": GridCNNMIL,
}


def create_mil_model(name: str, in_dim: int, num_outputs: int, **kwargs) -> nn.Module:
    """Build the MIL model registered as `name` in `MIL_MODELS`.

    Args:
        name: One of `MIL_MODELS` (e.g. 'mamba_mil_2d', 'abmil').
        in_dim: Feature size of a patch.
        num_outputs: Logits per bag (classes, or survival time bins).
        **kwargs: The model's other arguments (see its class).

    Raises:
        ValueError: `name` is not a registered MIL model.
    """
    if name not in MIL_MODELS:
        raise ValueError(f"unknown MIL model {name!r}; choose one of {', '.join(MIL_MODELS)}")
    return MIL_MODELS[name](in_dim=in_dim, num_outputs=num_outputs, **kwargs)
