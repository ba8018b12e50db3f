"""Pieces shared by the whole-slide MIL models: the output type, attention pooling and the per-slide patch grid.

Every MIL model takes one bag: `features` (N, in_dim), `positions` (N, 2) = integer (row, col) of each patch on its
slide's grid (cell = patch stride at level 0) and optionally `segments` (N,) = which slide of the bag each patch came
from (a case with several slides). Positions of different segments live on different grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MILOutput:
    """What every MIL model returns for one bag.

    Args:
        logits: (num_outputs,) for the bag.
        scores: (N,) per-patch attention or importance, in the input patch order (what heatmaps show).
    """

    logits: torch.Tensor
    scores: torch.Tensor


class AttentionPool(nn.Module):
    """Attention pooling over a bag (Ilse et al. 2018): w_i = softmax_i(W tanh(V h_i)), or with `gated`
    w_i = softmax_i(W (tanh(V h_i) * sigmoid(U h_i))); returns sum_i w_i h_i and the weights.

    Args:
        dim: Channels of each instance.
        hidden: Width of the attention MLP.
        gated: Add the sigmoid gate (ABMIL's gated attention). MambaMIL and 2DMambaMIL use the plain tanh form.
        dropout: Dropout after the tanh (and the gate).
    """

    def __init__(self, dim: int, hidden: int, gated: bool = True, dropout: float = 0.0):
        super().__init__()
        self.value = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.score = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (N, dim) of real patches only -> pooled (dim,), weights (N,) summing to 1."""
        hidden = self.value(h) if self.gate is None else self.value(h) * self.gate(h)
        weights = torch.softmax(self.score(hidden).squeeze(-1), dim=0)
        return weights @ h, weights


class RMSNorm2d(nn.Module):
    """RMSNorm over the channel axis of (B, C, H, W) maps: x / sqrt(mean(x^2) + eps) * weight.

    Args:
        dim: Channels.
        eps: Added to the mean square; 1e-5 as in the Mamba blocks 2DMambaMIL builds (mamba.py's RMSNorm).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(dim=1, keepdim=True) + self.eps).to(x.dtype)
        return x * scale * self.weight[:, None, None]


def check_bag(features: torch.Tensor, positions: torch.Tensor | None, segments: torch.Tensor | None, in_dim: int,
              model: str) -> None:
    """Check one bag's tensors before a model reads them, so that a wrong shape is named instead of failing deep
    inside the model.

    Args:
        features: (N, in_dim) patch features.
        positions: (N, 2) integer (row, col) grid cells, or None for a model that ignores them.
        segments: (N,) slide id of each patch, or None for a single slide.
        in_dim: The feature size the model was built for.
        model: The model's name, for the messages.

    Raises:
        ValueError: A tensor has the wrong shape, or the bag is empty.
        TypeError: `positions` is a floating-point tensor.
    """
    if features.dim() != 2 or features.shape[1] != in_dim:
        raise ValueError(f"{model}: features must be (N, in_dim={in_dim}), got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError(f"{model}: empty bag (0 patches)")
    n = features.shape[0]
    if positions is not None and (positions.dim() != 2 or positions.shape != (n, 2)):
        raise ValueError(f"{model}: positions must be (N={n}, 2) integer (row, col), got {tuple(positions.shape)}")
    if positions is not None and positions.is_floating_point():
        raise TypeError(f"{model}: positions must be an integer tensor of grid cells, got {positions.dtype}")
    if segments is not None and segments.shape != (n,):
        raise ValueError(f"{model}: segments must be (N={n},), got {tuple(segments.shape)}")


def split_segments(n: int, segments: torch.Tensor | None, device: torch.device) -> list[torch.Tensor]:
    """Indices of the patches of each slide of a bag (one index tensor per distinct segment id, in id order).

    Args:
        n: Patches in the bag.
        segments: (n,) slide id of each patch; None for a single slide.
        device: Where the index tensors go.
    """
    if segments is None:
        return [torch.arange(n, device=device)]
    return [torch.nonzero(segments == s).squeeze(1) for s in torch.unique(segments)]


def grid_layout(positions: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Where a slide's patches go on the grid of their bounding box.

    Args:
        positions: (N, 2) integer (row, col) of each patch of one slide.

    Returns:
        (flat cell index of each patch (N,), height, width) of the bounding box.

    Raises:
        ValueError: Two patches share a grid cell.
    """
    cells = positions - positions.min(dim=0).values
    last = cells.max(dim=0).values
    flat = cells[:, 0] * (last[1] + 1) + cells[:, 1]
    ordered = flat.sort().values
    shared = (ordered[1:] == ordered[:-1]).any()
    # the grid's size and the duplicate check reach the host together: one synchronisation per slide, not three
    height, width, duplicates = torch.stack((last[0] + 1, last[1] + 1, shared.to(last.dtype))).tolist()
    if duplicates:
        raise ValueError("MIL grid: two patches of one slide share a grid cell (duplicate positions)")
    return flat, height, width


def scatter_to_grid(h: torch.Tensor, flat: torch.Tensor, height: int, width: int, pad: torch.Tensor) -> torch.Tensor:
    """Real patch embeddings onto a (1, C, H, W) grid whose empty cells hold the `pad` token.

    Args:
        h: (n, C) embeddings of the real patches.
        flat: (n,) their flat cell indices (`grid_layout`).
        height: Rows of the grid.
        width: Columns of the grid.
        pad: (C,) token for the empty cells.
    """
    cells = height * width
    # the real patches on zeros, then the pad token where none landed: the backward is an index_select and a
    # where, never index_fill, which torch.compile mis-traced on a strided gradient before torch 2.12
    # (pytorch/pytorch#144846) as index_copy's own backward on pad's expansion would be
    canvas = h.new_zeros(cells, h.shape[1]).index_copy(0, flat, h)
    occupied = torch.zeros(cells, 1, dtype=torch.bool, device=h.device).index_fill_(0, flat, True)
    canvas = torch.where(occupied, canvas, pad.to(h.dtype))
    return canvas.t().reshape(1, -1, height, width)


def gather_from_grid(grid: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The inverse of `scatter_to_grid`: the (n, C) embeddings at the cells of the real patches.

    Args:
        grid: (1, C, H, W) map.
        flat: (n,) flat cell indices of the real patches.
    """
    return grid.flatten(2)[0].index_select(1, flat).t()


class LayerNorm2d(nn.LayerNorm):
    """nn.LayerNorm (eps 1e-5, as MambaMIL's) over the channel axis of (B, C, H, W) maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@torch.no_grad()
def xavier_init(module: nn.Module) -> None:
    """The initialisation MambaMIL and 2DMambaMIL apply to the whole model: every nn.Linear xavier-normal with a zero
    bias, every nn.LayerNorm weight 1 and bias 0. It reaches the Mamba blocks' projections too, so dt_proj's bias
    starts at 0 (softplus 0.69), not at Mamba's own dt initialisation.

    Args:
        module: The model, initialised in place.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def instance_embedding(in_dim: int, dim: int, dropout: float, act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """The per-patch embedding every MIL model starts with: Linear -> activation -> dropout.

    Args:
        in_dim: Feature size of a patch.
        dim: Embedding size.
        dropout: Dropout after the activation.
        act: The activation (GELU in MambaMIL and 2DMambaMIL, ReLU in ABMIL and the other baselines).
    """
    return nn.Sequential(nn.Linear(in_dim, dim), act(), nn.Dropout(dropout))


def linear_1x1(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """Apply an nn.Linear over the channel axis of an NCHW map (as a 1x1 convolution, so no permute copies).

    Args:
        x: (B, in_features, H, W) map.
        layer: The linear layer.
    """
    return F.conv2d(x, layer.weight[:, :, None, None], layer.bias)
