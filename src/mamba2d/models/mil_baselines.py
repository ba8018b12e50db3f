"""MIL baselines: ABMIL (gated attention), TransMIL (Nystrom attention + PPEG), mean pooling, max pooling and a
small CNN over the slide's patch grid.

All take the same bag arguments as 2DMambaMIL (features, positions, segments) and return `MILOutput`; the
permutation-invariant ones ignore positions and segments. The grid CNN is the spatially aware baseline: it sees the
same 2D neighbourhood as 2DMambaMIL, through local convolutions instead of a scan.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mil_layers import (
    AttentionPool,
    LayerNorm2d,
    MILOutput,
    check_bag,
    gather_from_grid,
    grid_layout,
    instance_embedding,
    scatter_to_grid,
    split_segments,
)

__all__ = ["ABMIL", "TransMIL", "MeanPoolMIL", "MaxPoolMIL", "GridCNNMIL", "NystromAttention"]


class ABMIL(nn.Module):
    """Attention-based MIL with gated attention (Ilse et al. 2018): Linear -> ReLU -> dropout -> gated attention
    pooling -> linear head. Scores: the attention weights. Positions and segments are not used.

    Args:
        in_dim: Feature size of a patch.
        num_outputs: Logits per bag.
        dim: Embedding size (512, CLAM's width).
        attn_dim: Width of the attention MLP (256, CLAM's width).
        dropout: Dropout after the embedding and in the attention MLP.
    """

    def __init__(self, in_dim: int = 1024, num_outputs: int = 2, dim: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25):
        super().__init__()
        self.in_dim = in_dim
        self.embed = instance_embedding(in_dim, dim, dropout, act=nn.ReLU)
        self.pool = AttentionPool(dim, attn_dim, gated=True, dropout=dropout)
        self.head = nn.Linear(dim, num_outputs)

    def forward(self, features: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> MILOutput:
        check_bag(features, positions, segments, self.in_dim, "ABMIL")
        pooled, scores = self.pool(self.embed(features))
        return MILOutput(self.head(pooled), scores)


class MeanPoolMIL(nn.Module):
    """Mean of instance embeddings. Scores: each patch's logit for the bag's top output (their mean is that logit).

    Args:
        in_dim: Feature size of a patch.
        num_outputs: Logits per bag.
        dim: Embedding size.
        dropout: Dropout after the embedding.
    """

    def __init__(self, in_dim: int = 1024, num_outputs: int = 2, dim: int = 512, dropout: float = 0.25):
        super().__init__()
        self.in_dim = in_dim
        self.embed = instance_embedding(in_dim, dim, dropout, act=nn.ReLU)
        self.head = nn.Linear(dim, num_outputs)

    def forward(self, features, positions=None, segments=None) -> MILOutput:
        check_bag(features, positions, segments, self.in_dim, "MeanPoolMIL")
        instance_logits = self.head(self.embed(features))
        logits = instance_logits.mean(dim=0)
        return MILOutput(logits, instance_logits[:, logits.argmax()])


class MaxPoolMIL(nn.Module):
    """Channel-wise max of instance embeddings. Scores: the fraction of channels whose max each patch supplies.

    Args:
        in_dim: Feature size of a patch.
        num_outputs: Logits per bag.
        dim: Embedding size.
        dropout: Dropout after the embedding.
    """

    def __init__(self, in_dim: int = 1024, num_outputs: int = 2, dim: int = 512, dropout: float = 0.25):
        super().__init__()
        self.in_dim = in_dim
        self.embed = instance_embedding(in_dim, dim, dropout, act=nn.ReLU)
        self.head = nn.Linear(dim, num_outputs)

    def forward(self, features, positions=None, segments=None) -> MILOutput:
        check_bag(features, positions, segments, self.in_dim, "MaxPoolMIL")
        h = self.embed(features)
        pooled, winners = h.max(dim=0)
        scores = torch.bincount(winners, minlength=h.shape[0]).to(h.dtype) / h.shape[1]
        return MILOutput(self.head(pooled), scores)


class _ConvBlock(nn.Module):
    """Residual 3x3 convolution block over an NCHW grid: channel LayerNorm -> conv -> GELU -> dropout, plus input.

    The norm is per cell (not GroupNorm over the grid), so a patch's output depends on its neighbourhood only.
    """

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(LayerNorm2d(dim), nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(),
                                  nn.Dropout(dropout))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid + self.body(grid)


class GridCNNMIL(nn.Module):
    """Spatially aware baseline (ours, not a published model): the patch embeddings are placed on each slide's
    grid (empty cells hold zeros), mixed by `num_layers` residual 3x3 convolution blocks, read back at the real
    patches and pooled with gated attention. With two layers every patch sees its 5x5 neighbourhood, which is what
    a local spatial pattern needs, at a fraction of a scan's cost.

    Args:
        in_dim: Feature size of a patch.
        num_outputs: Logits per bag.
        dim: Channels of the embedding and of the convolutions.
        num_layers: Residual convolution blocks.
        attn_dim: Width of the attention MLP of the pooling.
        dropout: Dropout after the embedding and in each block.
    """

    def __init__(self, in_dim: int = 1024, num_outputs: int = 2, dim: int = 128, num_layers: int = 2,
                 attn_dim: int = 128, dropout: float = 0.25):
        super().__init__()
        self.in_dim = in_dim
        self.embed = instance_embedding(in_dim, dim, dropout, act=nn.ReLU)
        self.blocks = nn.Sequential(*(_ConvBlock(dim, dropout) for _ in range(num_layers)))
        self.pool = AttentionPool(dim, attn_dim, gated=True, dropout=dropout)
        self.head = nn.Linear(dim, num_outputs)

    def forward(self, features: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> MILOutput:
        check_bag(features, positions, segments, self.in_dim, "GridCNNMIL")
        if positions is None:
            raise ValueError("GridCNNMIL: positions are required (the model convolves over the patch grid)")
        h = self.embed(features)
        zero = h.new_zeros(h.shape[1])
        mixed = torch.empty_like(h)
        for index in split_segments(h.shape[0], segments, h.device):
            flat, height, width = grid_layout(positions[index])
            grid = self.blocks(scatter_to_grid(h[index], flat, height, width, zero))
            mixed = mixed.index_copy(0, index, gather_from_grid(grid, flat))
        pooled, scores = self.pool(mixed)
        return MILOutput(self.head(pooled), scores)


def _moore_penrose_pinv(x: torch.Tensor, iters: int) -> torch.Tensor:
    """Iterative pseudo-inverse of a batch of (softmax) matrices (Razavi et al.), as Nystromformer uses."""
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    z = x.transpose(-1, -2) / (x.abs().sum(-1).amax() * x.abs().sum(-2).amax())
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nystrom approximation (Xiong et al. 2021): O(n) memory in the sequence
    length, so bags of 10^5 tokens fit. Sequences no longer than `landmarks` use exact softmax attention.
    A depthwise convolution over the values along the sequence is added (Nystromformer's residual). The defaults
    of `pinv_iters`, `conv_kernel` and `dropout` are the ones TransMIL uses.

    Args:
        dim: Channels of a token.
        heads: Attention heads; must divide `dim`.
        landmarks: Landmarks of the Nystrom approximation (segment means of the queries and keys).
        pinv_iters: Iterations of the Moore-Penrose pseudo-inverse.
        conv_kernel: Length of the depthwise convolution over the values.
        dropout: Dropout after the output projection.

    Raises:
        ValueError: `heads` does not divide `dim`.
    """

    def __init__(self, dim: int, heads: int = 8, landmarks: int = 256, pinv_iters: int = 6, conv_kernel: int = 33,
                 dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"NystromAttention: dim={dim} must be divisible by heads={heads}")
        self.heads, self.landmarks, self.pinv_iters = heads, landmarks, pinv_iters
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.value_conv = nn.Conv2d(heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads,
                                    bias=False)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)
        return q, k, v  # each (heads, n, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, dim) -> (n, dim)."""
        n = x.shape[0]
        q, k, v = self._split(x)
        if n <= self.landmarks:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # Pad at the front so the sequence splits into `landmarks` equal segments; landmarks = segment means.
            m = self.landmarks
            pad = (m - n % m) % m
            q, k, v = (F.pad(t, (0, 0, pad, 0)) for t in (q, k, v))
            q = q * self.head_dim**-0.5
            seg = q.shape[1] // m
            q_land = q.reshape(self.heads, m, seg, -1).mean(2)
            k_land = k.reshape(self.heads, m, seg, -1).mean(2)
            kernel_1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)
            kernel_2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)
            kernel_3 = torch.softmax(q_land @ k.transpose(-1, -2), dim=-1)
            out = (kernel_1 @ _moore_penrose_pinv(kernel_2, self.pinv_iters)) @ (kernel_3 @ v)
            out = (out + self.value_conv(v.unsqueeze(0))[0])[:, pad:]
        return self.out(out.permute(1, 0, 2).reshape(n, -1))

    def query_attention(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        """Exact softmax attention of one token over all tokens, averaged over heads (what TransMIL's scores are).

        Args:
            x: (n, dim) tokens.
            index: The querying token (0: TransMIL's class token).

        Returns:
            (n,) attention weights summing to 1.
        """
        q, k, _ = self._split(x)
        logits = (q[:, index:index + 1] @ k.transpose(-1, -2)) * self.head_dim**-0.5
        return torch.softmax(logits, dim=-1).mean(0)[0]


class _PPEG(nn.Module):
    """Pyramid position encoding generator: tokens folded into a square map, plus 7x7, 5x5 and 3x3 depthwise convs."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        grid = tokens.t().reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return grid.flatten(2)[0].t()


class TransMIL(nn.Module):
    """TransMIL (Shao et al. 2021): Linear -> ReLU, class token, Nystrom layer, PPEG, Nystrom layer, LayerNorm, head
    on the class token. As in the paper, tokens are folded into a square in input order (coordinates are not used)
    and the square is completed by repeating the first tokens. Scores: the class token's attention in the last layer
    (duplicated tokens credited to their original). Defaults are TransMIL's: dim 512, 8 heads, dim // 2
    landmarks, dropout 0.1.

    Args:
        in_dim: Feature size of a patch.
        num_outputs: Logits per bag.
        dim: Channels of the tokens.
        heads: Attention heads of both Nystrom layers.
        landmarks: Nystrom landmarks; None for dim // 2.
        dropout: Dropout after each attention layer's output projection.
    """

    def __init__(self, in_dim: int = 1024, num_outputs: int = 2, dim: int = 512, heads: int = 8,
                 landmarks: int | None = None, dropout: float = 0.1):
        super().__init__()
        self.in_dim = in_dim
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(dim) * 0.02)
        landmarks = landmarks or dim // 2
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = NystromAttention(dim, heads, landmarks, dropout=dropout)
        self.attn2 = NystromAttention(dim, heads, landmarks, dropout=dropout)
        self.ppeg = _PPEG(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimizer leaves out of weight decay (timm's convention): the class token."""
        return {"cls_token"}

    def forward(self, features, positions=None, segments=None) -> MILOutput:
        check_bag(features, positions, segments, self.in_dim, "TransMIL")
        h = self.embed(features)
        n = h.shape[0]
        side = math.ceil(math.sqrt(n))
        filler = torch.arange(side * side - n, device=h.device) % n
        h = torch.cat([self.cls_token[None], h, h[filler]])
        h = h + self.attn1(self.norm1(h))
        h = torch.cat([h[:1], self.ppeg(h[1:], side)])
        normed = self.norm2(h)
        h = h + self.attn2(normed)
        attention = self.attn2.query_attention(normed, 0)[1:]
        scores = attention[:n].index_add(0, filler, attention[n:])
        return MILOutput(self.head(self.norm(h[0])), scores / scores.sum())
