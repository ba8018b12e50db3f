"""Public entry point of the 2D selective scan: picks the CUDA kernels or the PyTorch reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import cuda_scan, library
from .contract import check_argument_types
from .flops import SHAPE_ONLY, shape_only_scan
from .reference import selective_scan_2d_ref

BACKENDS = ("auto", "cuda", "reference", SHAPE_ONLY)


def cuda_backend_available(u: torch.Tensor, B: torch.Tensor | None = None) -> bool:
    """True when `u` lives on a GPU and the CuPy kernels can run (CuPy importable, dtype and N supported).

    Args:
        u: The scan's input (its device and dtype decide).
        B: The scan's B, (batch, G, N, H, W), whose N is checked against the kernels' limit; None skips that check.
    """
    if u.device.type != "cuda":
        return False
    if B is not None and not cuda_scan.supports(u, B):
        return False
    return cuda_scan.cupy_importable()  # a tensor on a GPU: CUDA is there


def selective_scan_2d(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    direction: str | Sequence[str] = "tl_hv",
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    *,
    delta_proj: torch.Tensor | None = None,
    sum_groups: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """2D selective scan (the contract: docs/scan.md), on the CUDA kernels or the PyTorch reference.

    Per channel d, state n and pixel (i, j): `dt = softplus(delta + delta_bias)`, `Abar = exp(dt * A)`, a row scan
    `g[i,j] = Abar g[i,j-1] + dt B u`, a column scan `h[i,j] = Abar h[i-1,j] + g[i,j]`, `y = sum_n C h + D u`, gated
    by `silu(z)`; channel d uses the B/C group `d // (dim // G)`. Arithmetic accumulates in float32.

    Args:
        u: Input, (batch, dim, H, W) in float32, float16 or bfloat16 (float64: reference only), or
            (batch, P * dim / G, H, W) with P dividing G: P blocks of one map per channel of a group, group g
            reading block `g % P` (a block's gradient sums its groups'). The four routes of a 2D mixer share one u
            so (P = 1), instead of four copies; VMamba's four 1D routes share two, the map's row-major and
            column-major flattenings (P = 2).
        delta: Step sizes, (batch, dim, H, W) in u's dtype, or, with `delta_proj`, their low-rank factor
            (batch, G, R, H, W) in u's dtype (may be a strided view).
        A: State matrix, (dim, N) in float32, negative for a decaying state.
        B: Input projection, (batch, G, N, H, W) in u's dtype; dim must be divisible by G.
        C: Output projection, (batch, G, N, H, W) in u's dtype.
        D: Skip weights added as `D * u`, (dim,) in float32, or None.
        z: Gate applied as `y * silu(z)`, (batch, dim, H, W) in u's dtype, or None.
        delta_bias: Added to delta before softplus, (dim,) in float32, or None.
        delta_softplus: Whether dt is `softplus(delta + delta_bias)` (else `delta + delta_bias`).
        direction: Origin corner and pass order, one of `DIRECTIONS` (`{tl,tr,bl,br}_{hv,vh}`) or one name per
            group.
        out_dtype: The output's dtype: None (u's dtype) or torch.float32.
        backend: "auto" (the CUDA kernels for supported GPU tensors when CuPy is installed, else the reference),
            "cuda", "reference", or "shape_only" (zeros of the output's shape through one op that FLOP counters
            see: `mamba2d.ops.flops`).
        delta_proj: None, or the per-group projection (G, dim / G, R) of a low-rank delta: the scan's delta is
            then `einsum("gdr,bgrhw->bgdhw", delta_proj, delta)` flattened to (batch, dim, H, W), computed in
            delta's dtype (the weight cast to it; under CUDA autocast, in the autocast dtype). The CUDA backend
            keeps only the low-rank delta and the weight for its backward and recomputes the full delta there (as
            Mamba's fused mixer does); delta_proj's gradient is accumulated in float32 and has its dtype.
        sum_groups: Return y summed over the G groups, (batch, dim / G, H, W): channel c adds channel c of every
            group, as a 2D mixer sums its four routes; where the groups share u's P blocks, over each block's
            groups, (batch, P * dim / G, H, W). The CUDA backend sums in y's dtype, in a fixed order, and
            its backward reads the one gradient map per channel of a group for every group instead of expanding
            it to G copies.
        channels_last: Return y in channels_last memory format (same shape), the layout of a 2D mixer's next
            layers: the CUDA backend writes the groups' sum so in the same pass (`sum_groups`), instead of a sum
            and a layout copy, and its backward takes the gradient in that layout.

    Returns:
        y, (batch, dim, H, W) (delta's shape), or with `sum_groups` (batch, dim / G, H, W) (u's shape where the
        groups share u's blocks), in `out_dtype`.

    Raises:
        ValueError: An unknown `backend`, or a shape, direction or device outside the contract.
        TypeError: An argument of the wrong type or dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan_2d: backend must be one of {BACKENDS}, got {backend!r}")
    check_argument_types({"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
                          "delta_proj": delta_proj}, out_dtype)
    if backend == SHAPE_ONLY:
        return shape_only_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, direction, out_dtype,
                               delta_proj=delta_proj, sum_groups=sum_groups, channels_last=channels_last)
    if backend == "cuda" or (backend == "auto" and cuda_backend_available(u, B)):
        return library.selective_scan_2d_cuda(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, direction, out_dtype, delta_proj=delta_proj,
            sum_groups=sum_groups, channels_last=channels_last,
        )
    return selective_scan_2d_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, direction, out_dtype,
                                 delta_proj=delta_proj, sum_groups=sum_groups, channels_last=channels_last)
