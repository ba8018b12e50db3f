"""2DMambaMIL and the 1D MambaMIL baseline: Mamba blocks over a slide's patch grid (2D scan) or raster order (1D).

2DMambaMIL: features -> Linear -> GELU -> dropout -> per-slide grid (bounding box of the slide's patches, empty
cells hold a learnable pad token) -> U x [RMSNorm -> Mamba block with a 2D scan, gated by silu(z)] + residual ->
LayerNorm -> attention pooling over the REAL patches only -> head. Where and why this differs from the upstream
code: docs/wsi.md, "Fidelity to the published models".

Memory. The grid costs H x W cells per slide, not a dataset-wide canvas. The CUDA scan keeps the state in
registers; the pure-PyTorch reference (CPU) materialises (channels, d_state, H, W) float32 tensors, so the block
scans `scan_memory_mb`-sized channel chunks under activation checkpointing when the reference runs: peak scan memory
stays near that budget whatever the bag size, at the price of recomputing each chunk once in backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..ops import selective_scan_2d
from ..ops.scan import cuda_backend_available
from .mil_layers import (
    AttentionPool,
    LayerNorm2d,
    MILOutput,
    RMSNorm2d,
    check_bag,
    gather_from_grid,
    grid_layout,
    instance_embedding,
    linear_1x1,
    scatter_to_grid,
    split_segments,
    xavier_init,
)

__all__ = ["MambaBlock", "MambaMIL2D", "MambaMIL1D", "ATTENTIONS", "INITS"]

ATTENTIONS = ("tanh", "gated")
INITS = ("upstream", "mamba")



def reference_scan_live_tensors(height: int, width: int) -> int:
    """Float32 tensors of size (channels, d_state, H, W) alive at the reference scan's peak under autograd: decay,
    input and states, plus about three per step of each pass's log2-step parallel scan (kept for backward).

    Args:
        height: Rows of the scanned map.
        width: Columns of the scanned map.
    """
    steps = math.ceil(math.log2(max(width, 2))) + math.ceil(math.log2(max(height, 2)))
    return 4 + 3 * steps


class MambaBlock(nn.Module):
    """Mamba mixer over an NCHW map: in_proj -> (x, z); depthwise conv; SiLU; x_proj -> (dt, B, C); dt_proj;
    selective scan with D skip, fused silu(z) gate; out_proj.

    `layout="2d"`: 2D scan over the grid after a d_conv x d_conv 'same' depthwise conv. `layout="1d"`: input of
    height 1 (a sequence), causal depthwise conv of width d_conv, 1D scan (the op with H = 1).
    `directions`: one scan direction per group of channels (each group has its own B and C).

    Args:
        dim: Channels in and out.
        d_state: SSM states per channel (Mamba's 16).
        expand: Inner channels per channel (Mamba's 2).
        d_conv: Size of the depthwise convolution.
        dt_rank: Rank of the dt projection; "auto" is ceil(dim / 16), as Mamba's.
        layout: "2d" (a grid) or "1d" (a sequence of height 1).
        directions: Scan directions (see `mamba2d.ops.selective_scan_2d`), one per channel group; their count must
            divide expand * dim.
        scan_backend: "auto", "cuda" or "reference" (see `mamba2d.ops.selective_scan_2d`).
        scan_memory_mb: Budget of one reference-scan call: the reference scan runs in channel chunks of about this
            size under activation checkpointing; None for one call.
        dt_min: Smallest initial softplus(dt bias) (Mamba's initialisation).
        dt_max: Largest initial softplus(dt bias).
        dt_init_floor: Floor of the initial dt.

    Raises:
        ValueError: `layout` is unknown, or the directions do not divide the inner channels.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 3,
        dt_rank: int | str = "auto",
        layout: str = "2d",
        directions: Sequence[str] = ("tl_hv",),
        scan_backend: str = "auto",
        scan_memory_mb: float | None = 1024.0,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        if layout not in ("2d", "1d"):
            raise ValueError(f"MambaBlock: layout must be '2d' or '1d', got {layout!r}")
        d_inner = expand * dim
        self.directions = tuple([directions] if isinstance(directions, str) else directions)
        groups = len(self.directions)
        if d_inner % groups:
            raise ValueError(f"MambaBlock: expand*dim={d_inner} must be divisible by len(directions)={groups}")
        self.d_inner, self.d_state, self.groups, self.layout = d_inner, d_state, groups, layout
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend, self.scan_memory_mb, self.d_conv = scan_backend, scan_memory_mb, d_conv

        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        kernel = (d_conv, d_conv) if layout == "2d" else (1, d_conv)
        padding = (d_conv // 2, d_conv // 2) if layout == "2d" else (0, 0)
        self.conv = nn.Conv2d(d_inner, d_inner, kernel, padding=padding, groups=d_inner)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * groups * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self._init_dt(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init_dt(self, dt_min: float, dt_max: float, floor: float) -> None:
        """Mamba's initialisation: softplus(dt bias) log-uniform in [dt_min, dt_max]."""
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimizer leaves out of weight decay (timm's convention): the SSM's A_log and D."""
        return {"A_log", "D"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (1, dim, H, W) (H = 1 for layout '1d') -> (1, dim, H, W)."""
        u, z = linear_1x1(x, self.in_proj).chunk(2, dim=1)
        if self.layout == "1d":
            u = F.pad(u, (self.d_conv - 1, 0))  # causal: position j sees j-d_conv+1 .. j
        u = F.silu(self.conv(u))
        states = self.groups * self.d_state
        dt, B, C = linear_1x1(u, self.x_proj).split([self.dt_rank, states, states], 1)
        delta = F.conv2d(dt, self.dt_proj.weight[:, :, None, None])
        b, _, h, w = u.shape
        B = B.reshape(b, self.groups, self.d_state, h, w)
        C = C.reshape(b, self.groups, self.d_state, h, w)
        y = self._scan(u, delta, B.contiguous(), C.contiguous(), z)
        return linear_1x1(y, self.out_proj)

    def _scan(self, u, delta, B, C, z) -> torch.Tensor:
        A = -torch.exp(self.A_log.float())
        D, bias = self.D.float(), self.dt_proj.bias.float()
        chunk = self._reference_chunk(u, B)
        if chunk is None:
            return selective_scan_2d(u, delta, A, B, C, D=D, z=z, delta_bias=bias, direction=self.directions,
                                     out_dtype=u.dtype, backend=self.scan_backend)
        per_group = self.d_inner // self.groups
        pieces = []
        for g, direction in enumerate(self.directions):
            for start in range(g * per_group, (g + 1) * per_group, chunk):
                sl = slice(start, min(start + chunk, (g + 1) * per_group))
                args = (u[:, sl], delta[:, sl], A[sl], B[:, g:g + 1], C[:, g:g + 1], D[sl], z[:, sl], bias[sl])
                pieces.append(checkpoint(self._scan_piece, *args, direction, use_reentrant=False)
                              if torch.is_grad_enabled() else self._scan_piece(*args, direction))
        return torch.cat(pieces, dim=1)

    def _scan_piece(self, u, delta, A, B, C, D, z, bias, direction):
        return selective_scan_2d(u, delta, A, B, C, D=D, z=z, delta_bias=bias, direction=direction,
                                 out_dtype=u.dtype, backend="reference")

    def _reference_chunk(self, u: torch.Tensor, B: torch.Tensor | None = None) -> int | None:
        """Channels per reference-scan call so its working set fits scan_memory_mb; None = one call is fine."""
        if self.scan_memory_mb is None or self.scan_backend == "cuda":
            return None
        if self.scan_backend == "auto" and cuda_backend_available(u, B):  # the kernels support this shape/dtype
            return None
        live = reference_scan_live_tensors(u.shape[-2], u.shape[-1])
        per_channel = live * 4 * self.d_state * u.shape[-2] * u.shape[-1] * u.shape[0]
        chunk = max(1, int(self.scan_memory_mb * 2**20 // per_channel))
        return None if chunk >= self.d_inner // self.groups else chunk


class _ResidualMamba(nn.Module):
    """x + Mamba(norm(x)), a pre-norm residual Mamba layer."""

    def __init__(self, dim: int, norm: type[nn.Module], **block_kwargs):
        super().__init__()
        self.norm = norm(dim)
        self.mixer = MambaBlock(dim, **block_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class _MambaMIL(nn.Module):
    """Shared body of the 2D and 1D models; subclasses say how a slide's patches become a map and back and which
    norm starts each layer (the one their upstream model uses).

    Both follow their upstream models in what they compute around the mixer: features -> Linear -> GELU ->
    dropout, pre-norm residual Mamba layers, a final nn.LayerNorm (eps 1e-5), attention pooling and a linear head.
    By default the pooling and the initialisation are upstream's too: Linear(dim, 128) -> tanh -> Linear(128, 1),
    and xavier-normal on every Linear (`xavier_init`, upstream's `initialize_weights`, which also zeroes the Mamba
    blocks' dt bias). `attention="gated"` and `init="mamba"` give the ABMIL-style gated pooling and Mamba's own
    initialisation (dt log-uniform in [0.001, 0.1], PyTorch's Linear defaults) instead; docs/wsi.md shows where
    that matters.

    Args:
        in_dim: Feature size of a patch.
        num_outputs: Logits per bag (classes, or survival time bins).
        dim: Channels of the Mamba layers.
        num_layers: Residual Mamba layers.
        d_state: SSM states per channel.
        expand: Inner channels of a Mamba block per channel.
        d_conv: Size of the block's depthwise convolution.
        dropout: Dropout after the instance embedding.
        directions: Scan direction of each channel group (2D only).
        scan_backend: "auto", "cuda" or "reference".
        scan_memory_mb: Budget of one reference-scan call (CPU); None for no chunking.
        attn_dim: Width of the attention pooling MLP (128 upstream).
        attention: "tanh" (upstream's) or "gated" (ABMIL's gated attention).
        init: "upstream" (xavier-normal everywhere) or "mamba" (Mamba's dt initialisation, PyTorch's defaults).
    """

    layout = "2d"
    layer_norm: type[nn.Module] = RMSNorm2d

    def __init__(
        self,
        in_dim: int = 1024,
        num_outputs: int = 2,
        dim: int = 128,
        num_layers: int = 1,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 3,
        dropout: float = 0.25,
        directions: Sequence[str] = ("tl_hv",),
        scan_backend: str = "auto",
        scan_memory_mb: float | None = 1024.0,
        attn_dim: int = 128,
        attention: str = "tanh",
        init: str = "upstream",
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"{type(self).__name__}: num_layers must be >= 1, got {num_layers}")
        for name, value, allowed in (("attention", attention, ATTENTIONS), ("init", init, INITS)):
            if value not in allowed:
                raise ValueError(f"{type(self).__name__}: {name} must be one of {allowed}, got {value!r}")
        self.init = init
        self.in_dim = in_dim
        self.embed = instance_embedding(in_dim, dim, dropout)
        self.layers = nn.ModuleList(
            _ResidualMamba(dim, self.layer_norm, d_state=d_state, expand=expand, d_conv=d_conv, layout=self.layout,
                           directions=directions, scan_backend=scan_backend, scan_memory_mb=scan_memory_mb)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.pool = AttentionPool(dim, attn_dim, gated=attention == "gated")
        self.head = nn.Linear(dim, num_outputs)
        if init == "upstream":
            xavier_init(self)

    def _mix_slide(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, positions: torch.Tensor,
                segments: torch.Tensor | None = None) -> MILOutput:
        check_bag(features, positions, segments, self.in_dim, type(self).__name__)
        h = self.embed(features)
        mixed = torch.empty_like(h)
        for index in split_segments(h.shape[0], segments, h.device):
            mixed = mixed.index_copy(0, index, self._mix_slide(h[index], positions[index]))
        pooled, scores = self.pool(self.norm(mixed))
        return MILOutput(self.head(pooled), scores)


class MambaMIL2D(_MambaMIL):
    """2DMambaMIL: Mamba layers with the 2D selective scan over each slide's patch grid (see the module docstring).

    Each layer starts with an RMSNorm (eps 1e-5) and empty grid cells hold a trainable pad token, drawn from
    U[0, 1) as upstream's (with `init="mamba"`: N(0, 0.02²), truncated). Defaults are the paper's: dim 128, 1 layer,
    d_state 16, dropout 0.25.

    Args:
        in_dim: Feature size of a patch.
        num_outputs: Logits per bag.
        dim: Channels of the Mamba layers.
        **kwargs: See `_MambaMIL`.
    """

    layout = "2d"
    layer_norm = RMSNorm2d

    def __init__(self, in_dim: int = 1024, num_outputs: int = 2, dim: int = 128, **kwargs):
        super().__init__(in_dim, num_outputs, dim, **kwargs)
        self.pad_token = nn.Parameter(torch.empty(dim))
        if self.init == "mamba":
            nn.init.trunc_normal_(self.pad_token, std=0.02)
        else:
            nn.init.uniform_(self.pad_token, 0.0, 1.0)

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimizer leaves out of weight decay (timm's convention): the pad token."""
        return {"pad_token"}

    def _mix_slide(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        flat, height, width = grid_layout(positions)
        grid = scatter_to_grid(h, flat, height, width, self.pad_token)
        for layer in self.layers:
            grid = layer(grid)
        return gather_from_grid(grid, flat)


class MambaMIL1D(_MambaMIL):
    """MambaMIL baseline: Mamba layers with a 1D scan over the slide's patches in raster order (row by row, left
    to right), real patches only; positions set the order, not a 2D neighbourhood.

    As MambaMIL (Yang et al. 2024) with its plain `Mamba` layers: each layer starts with an nn.LayerNorm
    (eps 1e-5), a causal depthwise convolution of width 4; defaults dim 512 and 2 layers. MambaMIL's SRMamba
    (a second scan over a reordered sequence) is not built.

    Args:
        in_dim: Feature size of a patch.
        num_outputs: Logits per bag.
        dim: Channels of the Mamba layers.
        num_layers: Residual Mamba layers.
        d_conv: Width of the causal depthwise convolution.
        **kwargs: See `_MambaMIL`.
    """

    layout = "1d"
    layer_norm = LayerNorm2d

    def __init__(self, in_dim: int = 1024, num_outputs: int = 2, dim: int = 512, num_layers: int = 2,
                 d_conv: int = 4, **kwargs):
        super().__init__(in_dim, num_outputs, dim, num_layers=num_layers, d_conv=d_conv, **kwargs)

    def _mix_slide(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        flat, _, _ = grid_layout(positions)
        order = torch.argsort(flat)
        seq = h[order].t().reshape(1, -1, 1, h.shape[0])
        for layer in self.layers:
            seq = layer(seq)
        return torch.empty_like(h).index_copy(0, order, seq[0, :, 0].t())
