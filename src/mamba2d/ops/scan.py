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
    """True when `u` lives on a GPU and the CuPy kernels can run (CuPy importable, dtype and N supported)."""
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
) -> torch.Tensor:
    """2D selective scan (the contract: docs/scan.md).

    u, delta, z: (batch, dim, H, W); A: (dim, N) float32; B, C: (batch, G, N, H, W); D, delta_bias: (dim,) float32.
    `direction` is one of `{tl,tr,bl,br}_{hv,vh}` or one name per group. Returns (batch, dim, H, W) in `out_dtype`
    (default: u's dtype). `backend`: "auto" (CUDA kernels for GPU tensors when CuPy is installed, else reference),
    "cuda", "reference", or "shape_only" (zeros of the output's shape through one op that FLOP counters see:
    `mamba2d.ops.flops`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan_2d: backend must be one of {BACKENDS}, got {backend!r}")
    check_argument_types(
        {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}, out_dtype)
    if backend == SHAPE_ONLY:
        return shape_only_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, direction, out_dtype)
    if backend == "cuda" or (backend == "auto" and cuda_backend_available(u, B)):
        return library.selective_scan_2d_cuda(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, direction, out_dtype
        )
    return selective_scan_2d_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, direction, out_dtype)
