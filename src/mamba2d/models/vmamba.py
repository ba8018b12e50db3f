"""2DVMamba and VMamba backbones (VMamba "v2" design) with the 2D or the cross 1D selective scan.

`scan="2d"` runs the 2D selective scan in four directions (tl_hv, tl_vh, br_hv, br_vh): 2DVMamba.
`scan="cross1d"` runs VMamba's cross-scan: 1D scans over the row-major and column-major flattenings, both ways.
Both modes have exactly VMamba's parameters and parameter names, so one checkpoint layout serves both.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, fast_layer_norm, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model

from ..checkpoints import CheckpointError, check_state_dict, read_checkpoint
from ..compat import feature_take_indices, plain_module_call
from ..ops import cuda_layer_norm, cuda_layout, selective_scan_2d

__all__ = ["VSSM", "SS2D", "VSSBlock", "SCAN_DIRECTIONS", "DEFAULT_NORM_EPS"]

# Upstream VMamba and 2DVMamba build all their norms with nn.LayerNorm, whose eps is 1e-5.
DEFAULT_NORM_EPS = 1e-5

SCAN_DIRECTIONS = {
    "2d": ("tl_hv", "tl_vh", "br_hv", "br_vh"),
    "cross1d": ("tl_hv", "tl_hv", "tr_hv", "tr_hv"),
}


def _cfg(**kwargs):
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.0",
        "classifier": "classifier.head",
        "license": "apache-2.0",
        **kwargs,
    }


# The nano sizes are this repository's CPU-demo models, whose weights (the zoo's digits) were trained on inputs
# normalised to [-1, 1]; the published sizes take VMamba's ImageNet statistics.
_NANO_CFG = dict(input_size=(3, 32, 32), pool_size=(1, 1), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

default_cfgs = generate_default_cfgs(
    {
        f"{arch}_{size}": _cfg(**_NANO_CFG) if size == "nano" else _cfg()
        for arch in ("vmamba2d", "vmamba")
        for size in ("nano", "tiny", "small", "base")
    }
)


def _norm_out_dtype(x: torch.Tensor, gemm_input: bool) -> torch.dtype:
    """A layer norm's output dtype for input `x`: x's own outside autocast; under autocast the autocast dtype for a
    norm whose output only feeds a GEMM, float32 (autocast's rule for layer norms) for the others."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x.dtype
    return torch.get_autocast_dtype(device) if gemm_input else torch.float32


def _normalize_rows(norm: nn.LayerNorm, rows: torch.Tensor, gemm_input: bool) -> torch.Tensor:
    """`norm` over the last dimension of `rows`, in `_norm_out_dtype`: on the short-row CUDA kernels where they can
    run (`mamba2d.ops.cuda_layer_norm`; PyTorch's kernels idle most of their threads on rows of 48-768 channels),
    else PyTorch's norm (timm's `fast_layer_norm` for a `gemm_input` norm, which keeps the autocast dtype)."""
    if norm.kernel and cuda_layer_norm.usable(rows, norm.weight, norm.bias):
        return cuda_layer_norm.layer_norm(rows, norm.weight, norm.bias, norm.eps, _norm_out_dtype(rows, gemm_input))
    layer_norm = fast_layer_norm if gemm_input else F.layer_norm
    return layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class ChannelsLastLayerNorm2d(LayerNorm2d):
    """Layer norm over the channels of an NCHW map: timm's LayerNorm2d (same parameters, checkpoints and output
    dtype: float32 under autocast) with VMamba's eps. On a CUDA channels_last map it normalises on the short-row
    layer-norm kernels, forward and backward. The stem's, the downsampling steps' and the head's norms.

    Args:
        num_channels: Channels normalised per pixel.
        eps: Added to the variance. The default is upstream VMamba's and 2DVMamba's (they build every norm with
            `nn.LayerNorm`, eps 1e-5), not timm LayerNorm2d's 1e-6: SS2D's out_norm sees inputs of very small
            variance, where the two give different models.
        kernel: Normalise on the CUDA kernel where it can run; False keeps PyTorch's norm everywhere (the
            attribute of the same name may be changed on a built model, e.g. to compare the two).
    """

    def __init__(self, num_channels: int, eps: float = DEFAULT_NORM_EPS, kernel: bool = True):
        super().__init__(num_channels, eps=eps)
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _normalize_rows(self, x.permute(0, 2, 3, 1), gemm_input=False).permute(0, 3, 1, 2)


class GemmInputLayerNorm(nn.LayerNorm):
    """The layer norm of a block, over the channels of its (B, H, W, C) rows, whose output only feeds a GEMM (a
    block's norm, norm2 and out_norm): under autocast it normalises in the autocast dtype (as Apex does) instead of
    returning float32, which the GEMM would cast down anyway; the statistics stay float32. The norms that start a
    residual stream (stem, downsampling: `ChannelsLastLayerNorm2d`) return float32, so the stream keeps float32
    under autocast. Without autocast this is nn.LayerNorm; same parameters and checkpoints. On CUDA rows it runs the
    short-row layer-norm kernels, forward and backward.

    Args:
        num_channels: Channels normalised per pixel (the rows' last dimension).
        eps: Added to the variance (upstream's 1e-5 by default; see `ChannelsLastLayerNorm2d`).
        kernel: Normalise on the CUDA kernel where it can run; False keeps PyTorch's norm everywhere (also as an
            attribute of a built model).
    """

    def __init__(self, num_channels: int, eps: float = DEFAULT_NORM_EPS, kernel: bool = True):
        super().__init__(num_channels, eps=eps)
        self.kernel = kernel

    def out_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The output's dtype for input `x`: the autocast dtype under autocast, else x's.

        Args:
            x: The input rows.
        """
        return _norm_out_dtype(x, gemm_input=True)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return _normalize_rows(self, rows, gemm_input=True)


class Mlp(nn.Module):
    """VMamba's MLP on (B, H, W, C) rows: fc1 -> GELU -> dropout -> fc2 -> dropout (nn.Linear layers, whose
    (out, in) weights are what VMamba's checkpoints store for its 1x1-convolution Linear2d fc1 / fc2).

    Args:
        dim: Channels in and out.
        hidden: Hidden channels.
        drop: Dropout after the activation and after fc2.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SS2D(nn.Module):
    """VMamba's SS2D (v05_noz: no z gate, depthwise conv before the scan) with four scan routes, on (B, H, W, C)
    rows: the pixels of a channels_last map, so that its projections and its norm are plain GEMMs and row norms.

    in_proj -> depthwise conv -> SiLU -> per route: x_proj (dt, B, C), dt_proj, selective scan with D skip and
    softplus(dt + bias) -> routes summed -> out_norm -> out_proj. The parameters and their names are VMamba's.

    Args:
        d_model: Channels in and out.
        d_state: SSM states per channel.
        ssm_ratio: Inner channels per model channel.
        dt_rank: Rank of the dt projection; "auto" is ceil(d_model / 16).
        d_conv: Kernel size of the depthwise convolution.
        conv_bias: Whether that convolution has a bias.
        dropout: Dropout after out_proj.
        scan: "2d" (2DVMamba's four 2D directions) or "cross1d" (VMamba's 1D cross-scan).
        dt_min: Smallest initial softplus(dt bias).
        dt_max: Largest initial softplus(dt bias).
        dt_init_floor: Floor of the initial dt.
        scan_backend: "auto", "cuda" or "reference" (see `mamba2d.ops.selective_scan_2d`).
        norm_eps: eps of out_norm (upstream: 1e-5).

    Raises:
        ValueError: `scan` is neither "2d" nor "cross1d".
    """

    n_routes = 4

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        dropout: float = 0.0,
        scan: str = "2d",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str = "auto",
        norm_eps: float = DEFAULT_NORM_EPS,
    ):
        super().__init__()
        if scan not in SCAN_DIRECTIONS:
            raise ValueError(f"SS2D: scan must be one of {sorted(SCAN_DIRECTIONS)}, got {scan!r}")
        d_inner = int(ssm_ratio * d_model)
        self.d_inner, self.d_state, self.scan, self.scan_backend = d_inner, d_state, scan, scan_backend
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        k = self.n_routes

        self.in_proj = nn.Linear(d_model, d_inner, bias=False)
        self.act = nn.SiLU()
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        self.x_proj_weight = nn.Parameter(torch.empty(k, self.dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.out_norm = GemmInputLayerNorm(d_inner, norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._dt_init = (dt_min, dt_max, dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation: dt log-uniform in [dt_min, dt_max], A = -(1..N), D = 1."""
        if self.A_logs.is_meta:
            return
        dt_min, dt_max, floor = self._dt_init
        nn.init.uniform_(self.x_proj_weight, -self.d_inner**-0.5, self.d_inner**-0.5)
        nn.init.uniform_(self.dt_projs_weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        states = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_logs.copy_(torch.log(states).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def _scan(self, x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """The four routes' scans of `x` (b, d, h, w), summed; returned channels_last, like the residual stream. `u`
        is x's NCHW copy where the caller made it (with the activation; the 2D routes only), else it is made here.

        Layouts are chosen so that a training step moves little memory (`test_block_layout_copies` and
        `test_cross1d_block_layout_copies` count the copies): x is channels_last, the projections are GEMMs that
        write their outputs where the scan reads them, and every gradient comes back in its tensor's own layout.
        """
        b, d, h, w = x.shape
        k, n, r = self.n_routes, self.d_state, self.dt_rank
        rows = x.permute(0, 2, 3, 1).flatten(1, 2)  # (b, h*w, d)
        # x_proj as one GEMM with the pixels as columns: x_dbl is (route, channel, batch, pixel), so B and C are
        # views with w innermost, as the 2D scan reads them; as the pixels enter transposed, autograd returns their
        # gradient channels_last.
        x_dbl = torch.mm(self.x_proj_weight.flatten(0, 1), rows.flatten(0, 1).t()).view(k, -1, b, h, w)
        if self.scan == "cross1d":
            # VMamba's cross-scan as one scan of its four routes on two copies of x, the row-major flattening (read
            # by routes 0 and 2) and the column-major one (routes 1 and 3): u holds both, each route reading its
            # own (the scan's groups share u's blocks), and the op sums each copy's pair of routes; the two sums
            # meet in one cross-merge. The routes' dts, B and C (r + 2N channels, not d) are copied into their
            # routes' order.
            dts, B, C = torch.split(_RouteOrder.apply(x_dbl).unsqueeze(-2), [r, n, n], dim=2)
            y = self._scan_routes(_CrossScan.apply(x).view(b, 2 * d, 1, h * w), dts, B, C, channels_last=False)
            return _CrossMerge.apply(y.view(b, 2, d, h * w), h, w)
        u = _Relayout.apply(x, cuda_layout.to_nchw, cuda_layout.to_channels_last) if u is None else u
        dts, B, C = torch.split(x_dbl, [r, n, n], dim=1)
        # The four 2D routes read one NCHW copy of x (the scan's shared u), not four: a quarter of the copy's traffic
        # and of what the scan keeps for its backward, which returns the routes' summed gradient. The op sums the
        # routes too, so its backward reads one gradient map per channel for all four (summed outside, autograd
        # would expand the gradient to four copies), and writes the sum channels_last in the same pass (through
        # shared-memory tiles, so that reads and writes are both whole lines).
        return self._scan_routes(u, *(t.permute(2, 0, 1, 3, 4) for t in (dts, B, C)), channels_last=True)

    def _scan_routes(self, u: torch.Tensor, dts: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     channels_last: bool) -> torch.Tensor:
        """The four routes' scans in one call, summed over the routes that read the same maps of u. dt_proj (rank
        r -> d, one weight per route) runs inside the scan op (delta_proj, a GEMM batched over (image, route)), which
        keeps the r-channel dts for its backward and recomputes delta there, instead of keeping the d-channel delta
        (d / r = 16 times larger in the tiny model).

        Args:
            u: (b, d, H, W), shared by the four routes, or (b, 2 d, H, W): two copies, route i reading copy i % 2.
            dts: (b, routes, r, H, W), the low-rank delta.
            B: (b, routes, N, H, W).
            C: (b, routes, N, H, W).
            channels_last: Return the sum channels_last.
        """
        # A = -exp(A_log), D and delta_bias in float32; no view or cast that would leave the values as they are
        # (each is an operator for the host to dispatch, in both passes)
        A, D = -torch.exp(_to(self.A_logs, torch.float32)), _to(self.Ds, torch.float32)
        dtype = u.dtype
        return selective_scan_2d(
            u,
            _to(dts, dtype),
            A,
            _to(B, dtype),
            _to(C, dtype),
            D=D,
            delta_bias=_to(self.dt_projs_bias, torch.float32).flatten(),
            delta_softplus=True,
            direction=SCAN_DIRECTIONS[self.scan],
            backend=self.scan_backend,
            delta_proj=self.dt_projs_weight,
            sum_groups=True,
            channels_last=channels_last,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mixer of `x`'s rows, returned as rows.

        Args:
            x: (B, H, W, d_model), contiguous where it is a channels_last map's pixels (the layout the GEMMs and the
                kernels take without a copy).
        """
        # the projection's rows seen as an NCHW map are channels_last, which the depthwise convolution keeps
        x = self.conv2d(self.in_proj(x).permute(0, 3, 1, 2))
        if self.scan == "2d" and cuda_layout.silu_usable(x):
            # the activation writes its output in both layouts at once: channels_last for the projections, NCHW for
            # the 2D scan (one pass instead of the activation's and the copy's; its backward adds the two gradients)
            x, u = cuda_layout.silu_both_layouts(x)
        else:
            x = self.act(x)
            u = None
        y = self.out_norm(self._scan(x, u).permute(0, 2, 3, 1))
        return self.dropout(self.out_proj(y))


class _Relayout(torch.autograd.Function):
    """A map copied into another layout by `there`, whose gradient `back` copies into the map's own layout: the scan
    reads NCHW while the projections and the residual stream are channels_last, and a gradient added to another in
    a different layout would be read strided."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, there, back) -> torch.Tensor:
        ctx.back = back
        return there(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.back(grad), None, None


def _cross_merge(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """VMamba's cross-merge of the row-major and the column-major maps y (b, 2, d, H * W): their sum as a
    channels_last (b, d, H, W) map, the column-major one transposed in the pass that adds it."""
    b, _, d, _ = y.shape
    out = torch.empty((b, d, h, w), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    return torch.add(y[:, 0].view(b, d, h, w), y[:, 1].view(b, d, w, h).transpose(-1, -2), out=out)


class _CrossScan(torch.autograd.Function):
    """VMamba's cross-scan of a channels_last map x (b, d, H, W): its row-major and column-major flattenings as
    (b, 2, d, H * W), each written once into its half (`cuda_layout.cross_copies`); the gradient is the
    cross-merge of the copies' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.map_size = x.shape[-2:]
        return cuda_layout.cross_copies(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _cross_merge(grad, *ctx.map_size)


class _CrossMerge(torch.autograd.Function):
    """`_cross_merge`, whose gradient is the cross-scan of the sum's gradient (`cuda_layout.cross_copies`)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return _cross_merge(y, h, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return cuda_layout.cross_copies(grad), None, None


class _RouteOrder(torch.autograd.Function):
    """x_proj's output (routes, c, b, H, W) as each of VMamba's four 1D routes reads it, (b, routes, c, H * W):
    routes 0 and 2 in row-major order, 1 and 3 in column-major order; the gradient goes back the same way."""

    @staticmethod
    def forward(ctx, x_dbl: torch.Tensor) -> torch.Tensor:
        k, c, b, h, w = x_dbl.shape
        ctx.map_size = (h, w)
        out = x_dbl.new_empty((b, k, c, h * w))
        out[:, 0::2].view(b, k // 2, c, h, w).copy_(x_dbl[0::2].permute(2, 0, 1, 3, 4))
        out[:, 1::2].view(b, k // 2, c, w, h).copy_(x_dbl[1::2].permute(2, 0, 1, 4, 3))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        b, k, c, _ = grad.shape
        h, w = ctx.map_size
        out = grad.new_empty((k, c, b, h, w))
        out[0::2].permute(2, 0, 1, 3, 4).copy_(grad[:, 0::2].view(b, k // 2, c, h, w))
        out[1::2].permute(2, 0, 1, 4, 3).copy_(grad[:, 1::2].view(b, k // 2, c, w, h))
        return out


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`: t itself when it has that dtype already, without dispatching the `to` operator (as `t.to`
    would, to return t)."""
    return t if t.dtype == dtype else t.to(dtype)


def _add_scaled(x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x + branch, the branch scaled per sample by `scale` (`VSSBlock._drop_scale`; None for 1) as timm's DropPath
    scales it: the factor in the branch's dtype.

    Args:
        x: The residual stream, (B, ...).
        branch: What is added to it, same shape.
        scale: float32 (B,) factors, or None.
    """
    if scale is None:
        return x + branch
    return x + branch * scale.to(branch.dtype).view(-1, *(1,) * (branch.dim() - 1))


class VSSBlock(nn.Module):
    """VMamba's block: x + SS2D(norm(x)), then x + MLP(norm2(x)), each branch with drop path. It takes and returns
    an NCHW map (stored channels_last, as VSSM's stream is) and works on its (B, H, W, C) rows inside, as timm's
    ConvNeXt block does, so that its norms and projections need no permute each.

    Args:
        dim: Channels.
        drop_path: Drop-path probability of both branches.
        mlp_ratio: Hidden channels of the MLP per channel.
        norm_eps: eps of norm, norm2 and SS2D's out_norm (upstream: 1e-5).
        **ssm_kwargs: Passed to `SS2D`.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0,
                 norm_eps: float = DEFAULT_NORM_EPS, **ssm_kwargs):
        super().__init__()
        self.norm = GemmInputLayerNorm(dim, norm_eps)
        self.op = SS2D(dim, norm_eps=norm_eps, **ssm_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = GemmInputLayerNorm(dim, norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _add_scaled(*self.forward_deferred([x.permute(0, 2, 3, 1)])).permute(0, 3, 1, 2)

    def forward_deferred(self, stream: list) -> list:
        """The block with its last residual sum left to the caller: returns [x, branch, scale], whose `_add_scaled`
        is `forward`'s output. A stage hands each block's to the next block, whose first norm takes that sum in the
        same kernel (`_add_norm`) instead of an add and a drop-path multiply before it.

        Args:
            stream: [x], the residual stream as (B, H, W, dim) rows, or the previous block's [x, branch, scale] still
                to be summed. Emptied here: a caller's reference would otherwise keep the old stream and branch alive
                for the whole block after they are summed.
        """
        # No starred unpacking: older TorchDynamo (torch 2.11 among them) traces its starred part as a tuple.
        if len(stream) == 1:
            x = stream.pop()
            y = self.norm(x)
        else:
            x, branch, scale = stream
            stream.clear()
            x, y = self._add_norm(x, branch, scale, self.norm)
            del branch, scale
        branch = self.op(y)
        x, y = self._add_norm(x, branch, self._drop_scale(branch), self.norm2)
        branch = self.mlp(y)
        return [x, branch, self._drop_scale(branch)]

    @staticmethod
    def _add_norm(x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None,
                  norm: GemmInputLayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + scale * branch, norm of that sum) of (B, H, W, C) rows. On CUDA one kernel computes both (and, in the
        backward, adds the sum's two gradients and scales the branch's) instead of an add, a drop-path multiply and
        the norm, each a pass over the map; elsewhere `_add_scaled` and the norm module, the same drop-path draws
        either way."""
        if not (norm.kernel and x.shape == branch.shape and branch.is_contiguous()
                and cuda_layer_norm.usable(x, norm.weight, norm.bias)):
            x = _add_scaled(x, branch, scale)
            return x, norm(x)
        return cuda_layer_norm.add_layer_norm(x, branch, scale, x.shape[1] * x.shape[2], norm.weight, norm.bias,
                                              norm.eps, norm.out_dtype(x))

    def _drop_scale(self, branch: torch.Tensor) -> torch.Tensor | None:
        """The drop path's per-sample factor of `branch` as float32 (samples,), drawn and rounded as timm's
        DropPath draws it for the same tensor (same generator calls, in the branch's dtype); None when it keeps
        everything (evaluation, or no drop path)."""
        drop = self.drop_path
        if not isinstance(drop, DropPath) or drop.drop_prob == 0.0 or not drop.training:
            return None
        keep = 1 - drop.drop_prob
        factor = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and drop.scale_by_keep:
            factor.div_(keep)
        return _to(factor.view(-1), torch.float32)


class VSSM(nn.Module):
    """Hierarchical VMamba v2 backbone. Stage i outputs dims[i] channels at stride 4 * 2**i.

    Feature maps are NCHW tensors stored channels_last (see `_embed`).

    Args:
        in_chans: Image channels.
        num_classes: Classes of the head; 0 for none.
        dims: Channels per stage, or the first stage's (doubled at each stage).
        depths: Blocks per stage.
        d_state: SSM states per channel.
        ssm_ratio: SS2D inner channels per channel.
        dt_rank: Rank of SS2D's dt projection ("auto": ceil(dim / 16)).
        d_conv: SS2D's depthwise convolution size.
        conv_bias: Whether that convolution has a bias.
        mlp_ratio: MLP hidden channels per channel.
        drop_rate: Dropout before the head.
        drop_path_rate: Largest drop-path rate (linear over the blocks).
        scan: "2d" (2DVMamba) or "cross1d" (VMamba).
        scan_backend: "auto", "cuda" or "reference".
        global_pool: "avg" or "" (no pooling).
        feature_norms: Add the per-stage norms outnorm0..3 of VMamba's dense backbone.
        norm_eps: eps of every layer norm (stem, downsampling, blocks, out_norm, stage and head norms). The
            default, 1e-5, is upstream's; official checkpoints compute what they were trained to only with it.

    Raises:
        ValueError: `global_pool` is neither "avg" nor "", or `dims` and `depths` differ in length.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        dims: Sequence[int] | int = 96,
        depths: Sequence[int] = (2, 2, 9, 2),
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        scan: str = "2d",
        scan_backend: str = "auto",
        global_pool: str = "avg",
        feature_norms: bool = False,
        norm_eps: float = DEFAULT_NORM_EPS,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"VSSM: global_pool must be 'avg' or '', got {global_pool!r}")
        depths = tuple(depths)
        dims = tuple(int(dims) * 2**i for i in range(len(depths))) if isinstance(dims, int) else tuple(dims)
        if len(dims) != len(depths):
            raise ValueError(f"VSSM: dims {dims} and depths {depths} must have the same length")
        self.in_chans, self.num_classes, self.dims, self.scan = in_chans, num_classes, dims, scan
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        norm = partial(ChannelsLastLayerNorm2d, eps=norm_eps)

        # Index layout (conv, -, norm, -, act, conv, -, norm) mirrors VMamba's channel-last variant so that
        # checkpoint keys (patch_embed.0/2/5/7) match without renaming.
        self.patch_embed = nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, 3, 2, 1), nn.Identity(), norm(dims[0] // 2),
            nn.Identity(), nn.GELU(), nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), nn.Identity(), norm(dims[0]),
        )
        ssm_kwargs = dict(
            d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv, conv_bias=conv_bias, scan=scan,
            scan_backend=scan_backend, norm_eps=norm_eps,
        )
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            blocks = nn.Sequential(
                *(VSSBlock(dims[i], rates[first + j], mlp_ratio, **ssm_kwargs) for j in range(depth))
            )
            downsample = (
                nn.Sequential(nn.Identity(), nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1), nn.Identity(),
                              norm(dims[i + 1]))
                if i < len(depths) - 1
                else nn.Identity()
            )
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=downsample)))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"layers.{i}.blocks"))
        if feature_norms:  # the per-stage norms of VMamba's dense-prediction backbone
            for i, dim in enumerate(dims):
                self.add_module(f"outnorm{i}", norm(dim))
        self.classifier = nn.Sequential(OrderedDict(
            norm=norm(self.num_features), permute=nn.Identity(),
            avgpool=nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity(),
            flatten=nn.Flatten(1) if global_pool else nn.Identity(),
            head=nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity(),
        ))
        self.global_pool = global_pool
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear) and not m.weight.is_meta:
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters the optimizer leaves out of weight decay (timm's convention): norms, biases, A_logs and Ds."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or name.endswith(("A_logs", "Ds"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (for layer-wise learning-rate decay): the stem, then the blocks.

        Args:
            coarse: One group per stage instead of one per block.
        """
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else r"^layers\.(\d+)\.blocks\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them (timm's interface).

        Args:
            enable: Turn activation checkpointing on or off.
        """
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classification head (an nn.Identity without one)."""
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one (timm's interface, e.g. for fine-tuning).

        Args:
            num_classes: Classes of the new head; 0 for none (the model returns pooled features).
            global_pool: "avg" or "" (no pooling); None keeps the current pooling.

        Raises:
            ValueError: `global_pool` is neither "avg" nor "".
        """
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"reset_classifier: global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
            self.classifier.avgpool = nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()
            self.classifier.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load weights from a file: timm's route for pretrained cfgs with `custom_load` (the zoo's entries).

        The file is read without unpickling code and, when the zoo knows its name, checked against its sha256
        (`mamba2d.checkpoints.read_checkpoint`), then unwrapped (`checkpoint_filter_fn`) and loaded strictly: every
        missing, unexpected or wrongly shaped key fails the load. Two exceptions, both timm's rules: a classifier
        head of another shape is not loaded (fine-tuning to another class count), and a dense backbone's file (no
        classifier) leaves the classifier's norm as initialised; a classification file leaves the per-stage norms
        of a features_only model as initialised.

        Args:
            checkpoint_path: A safetensors file or a torch checkpoint in VMamba's, mmengine's or our layout.

        Raises:
            CheckpointError: The file is missing or unreadable.
            CheckpointMismatch: Its weights do not fit this model.
        """
        source = str(checkpoint_path)
        if not Path(source).is_file():
            url = (getattr(self, "pretrained_cfg", None) or {}).get("url")
            raise CheckpointError(f"pretrained weights {source} not found" + (
                f"; download {url} to that path (`mamba2d zoo fetch` does it for zoo entries)" if url else ""))
        state = checkpoint_filter_fn(read_checkpoint(source), self)
        own = self.state_dict()
        head = ("classifier.head.weight", "classifier.head.bias")
        if any(k in state and (k not in own or state[k].shape != own[k].shape) for k in head):
            state = {k: v for k, v in state.items() if k not in head}
        missing_ok = []
        if not any(k.startswith("classifier.") for k in state):
            missing_ok += [k for k in own if k.startswith("classifier.")]
        if not any(k.startswith("outnorm") for k in state):
            missing_ok += [k for k in own if k.startswith("outnorm")]
        check_state_dict(self, state, source, missing_ok)
        self.load_state_dict(state, strict=not missing_ok)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{type(self).__name__}: expected an image batch of shape (batch, {self.in_chans}, H, W), "
                f"got {tuple(x.shape)}"
            )

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        # The residual stream is channels_last from the input on (the image has 3 channels: the cheapest place to
        # convert): LayerNorm2d's NHWC permute is then a view, the convolutions run natively channels_last, and the
        # residual adds and SS2D's projections see one layout throughout.
        return self.patch_embed(x.contiguous(memory_format=torch.channels_last))

    def _run_blocks(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in blocks:
                x = checkpoint(block, x)
            return x
        if not all(type(block) is VSSBlock and plain_module_call(block) for block in blocks):
            for block in blocks:  # hooked, compiled or wrapped blocks are called as modules
                x = block(x)
            return x
        # each block's last residual sum is taken by the next block's first norm, in one kernel on CUDA; the blocks
        # work on the map's (B, H, W, C) rows, a view of the channels_last stream
        stream = [x.permute(0, 2, 3, 1)]
        for block in blocks:
            stream = block.forward_deferred(stream)
        return (stream[0] if len(stream) == 1 else _add_scaled(*stream)).permute(0, 3, 1, 2)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs (before downsampling) at strides 4, 8, 16, 32 (timm's interface).

        Args:
            x: (B, in_chans, H, W) images.
            indices: Stages to return: None for all, an int n for the last n, or a list of indices.
            norm: Pass each stage output through its per-stage norm (outnorm<i>, with `feature_norms`).
            stop_early: Skip the stages after the last one returned.
            output_fmt: Only "NCHW".
            intermediates_only: Return the stage outputs only, not the final map.

        Returns:
            The stage outputs, or (final map, stage outputs) unless `intermediates_only`.

        Raises:
            ValueError: `output_fmt` is not "NCHW", or `x` is not an image batch of `in_chans` channels.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"forward_intermediates: only output_fmt='NCHW' is supported, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        intermediates = []
        x = self._embed(x)
        layers = self.layers[: max_index + 1] if stop_early else self.layers
        for i, layer in enumerate(layers):
            stage_out = self._run_blocks(layer.blocks, x)
            if i in take_indices:
                stage_norm = getattr(self, f"outnorm{i}", None)
                intermediates.append(stage_norm(stage_out) if norm and stage_norm is not None else stage_out)
            x = layer.downsample(stage_out)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Drop the stages after the last of `indices` and, optionally, the head and its norm (timm's interface).

        Args:
            indices: Stages that must remain (as in `forward_intermediates`).
            prune_norm: Replace the head's norm with an identity.
            prune_head: Remove the classifier and the pooling.

        Returns:
            The indices of the stages kept for output.
        """
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        if prune_norm:
            self.classifier.norm = nn.Identity()
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map (B, dims[-1], H / 32, W / 32), before the head's norm (timm's interface).

        Args:
            x: (B, in_chans, H, W) images.

        Raises:
            ValueError: `x` is not an image batch of `in_chans` channels.
        """
        x = self._embed(x)
        for layer in self.layers:
            x = layer.downsample(self._run_blocks(layer.blocks, x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Norm, pooling, dropout and head over `forward_features`' map (timm's interface).

        Args:
            x: The last stage's map.
            pre_logits: Stop before the linear head (pooled features).
        """
        c = self.classifier
        x = c.flatten(c.avgpool(c.norm(x)))
        x = F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate else x
        return x if pre_logits else c.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: VSSM) -> dict:
    """Our VSSM's weights out of a checkpoint in VMamba's layouts: unwrap {'model': ...} / {'state_dict': ...} and
    keep the keys under a dense 'backbone.' prefix (or a Lightning task's 'model.') without it.

    Args:
        state_dict: The checkpoint as read.
        model: The model the weights are for (timm's filter signature).

    Returns:
        The model's state dict, keys as `VSSM` names them.
    """
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    for prefix in ("backbone.", "model."):
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def _create_vssm(variant: str, pretrained: bool = False, **kwargs) -> VSSM:
    feature_cfg = dict(out_indices=(0, 1, 2, 3), feature_cls="getter")
    if kwargs.get("features_only"):
        kwargs.setdefault("feature_norms", True)
        feature_cfg["norm"] = kwargs["feature_norms"]
    return build_model_with_cfg(
        VSSM, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg, **kwargs
    )


# Published VMamba sizes (s1l8 tiny, s2l15 small/base) and a nano size for CPU demos.
MODEL_SIZES = {
    "nano": dict(dims=32, depths=(1, 1, 2, 1), d_state=1, ssm_ratio=1.0, drop_path_rate=0.05),
    "tiny": dict(dims=96, depths=(2, 2, 8, 2), d_state=1, ssm_ratio=1.0, drop_path_rate=0.2),
    "small": dict(dims=96, depths=(2, 2, 15, 2), d_state=1, ssm_ratio=2.0, drop_path_rate=0.3),
    "base": dict(dims=128, depths=(2, 2, 15, 2), d_state=1, ssm_ratio=2.0, drop_path_rate=0.6),
}


def _build(arch: str, size: str, pretrained: bool, **kwargs) -> VSSM:
    scan = "2d" if arch == "vmamba2d" else "cross1d"
    return _create_vssm(f"{arch}_{size}", pretrained, **{**MODEL_SIZES[size], "scan": scan, **kwargs})


@register_model
def vmamba2d_nano(pretrained: bool = False, **kwargs) -> VSSM:
    """2DVMamba (the 2D selective scan) at the nano size for CPU demos and tests (`MODEL_SIZES["nano"]`).

    Args:
        pretrained: Load pretrained weights through timm: the tag named in `timm.create_model`, else the
            architecture's first zoo entry.
        **kwargs: `VSSM` arguments overriding the size's, and timm's `create_model` options (features_only, ...).
    """
    return _build("vmamba2d", "nano", pretrained, **kwargs)


@register_model
def vmamba2d_tiny(pretrained: bool = False, **kwargs) -> VSSM:
    """2DVMamba (the 2D selective scan) at VMamba's published tiny size (s1l8; `MODEL_SIZES["tiny"]`).

    Args:
        pretrained: Load pretrained weights through timm: the tag named in `timm.create_model`, else the
            architecture's first zoo entry.
        **kwargs: `VSSM` arguments overriding the size's, and timm's `create_model` options (features_only, ...).
    """
    return _build("vmamba2d", "tiny", pretrained, **kwargs)


@register_model
def vmamba2d_small(pretrained: bool = False, **kwargs) -> VSSM:
    """2DVMamba (the 2D selective scan) at VMamba's published small size (s2l15; `MODEL_SIZES["small"]`).

    Args:
        pretrained: Load pretrained weights through timm: the tag named in `timm.create_model`, else the
            architecture's first zoo entry.
        **kwargs: `VSSM` arguments overriding the size's, and timm's `create_model` options (features_only, ...).
    """
    return _build("vmamba2d", "small", pretrained, **kwargs)


@register_model
def vmamba2d_base(pretrained: bool = False, **kwargs) -> VSSM:
    """2DVMamba (the 2D selective scan) at VMamba's published base size (s2l15; `MODEL_SIZES["base"]`).

    Args:
        pretrained: Load pretrained weights through timm: the tag named in `timm.create_model`, else the
            architecture's first zoo entry.
        **kwargs: `VSSM` arguments overriding the size's, and timm's `create_model` options (features_only, ...).
    """
    return _build("vmamba2d", "base", pretrained, **kwargs)


@register_model
def vmamba_nano(pretrained: bool = False, **kwargs) -> VSSM:
    """VMamba (the cross 1D selective scan) at the nano size for CPU demos and tests (`MODEL_SIZES["nano"]`).

    Args:
        pretrained: Load pretrained weights through timm: the tag named in `timm.create_model`, else the
            architecture's first zoo entry.
        **kwargs: `VSSM` arguments overriding the size's, and timm's `create_model` options (features_only, ...).
    """
    return _build("vmamba", "nano", pretrained, **kwargs)


@register_model
def vmamba_tiny(pretrained: bool = False, **kwargs) -> VSSM:
    """VMamba (the cross 1D selective scan) at VMamba's published tiny size (s1l8; `MODEL_SIZES["tiny"]`).

    Args:
        pretrained: Load pretrained weights through timm: the tag named in `timm.create_model`, else the
            architecture's first zoo entry.
        **kwargs: `VSSM` arguments overriding the size's, and timm's `create_model` options (features_only, ...).
    """
    return _build("vmamba", "tiny", pretrained, **kwargs)


@register_model
def vmamba_small(pretrained: bool = False, **kwargs) -> VSSM:
    """VMamba (the cross 1D selective scan) at VMamba's published small size (s2l15; `MODEL_SIZES["small"]`).

    Args:
        pretrained: Load pretrained weights through timm: the tag named in `timm.create_model`, else the
            architecture's first zoo entry.
        **kwargs: `VSSM` arguments overriding the size's, and timm's `create_model` options (features_only, ...).
    """
    return _build("vmamba", "small", pretrained, **kwargs)


@register_model
def vmamba_base(pretrained: bool = False, **kwargs) -> VSSM:
    """VMamba (the cross 1D selective scan) at VMamba's published base size (s2l15; `MODEL_SIZES["base"]`).

    Args:
        pretrained: Load pretrained weights through timm: the tag named in `timm.create_model`, else the
            architecture's first zoo entry.
        **kwargs: `VSSM` arguments overriding the size's, and timm's `create_model` options (features_only, ...).
    """
    return _build("vmamba", "base", pretrained, **kwargs)
