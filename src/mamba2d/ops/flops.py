"""FLOP formula of the selective scan, and an opaque op through which FLOP counters see one scan as one node.

Counting convention (VMamba's tables, 2DVMamba's paper): one multiply-add is one FLOP. For a scan over
B batches, D channels, N states and L = H * W positions

    1D scan:  9 * B * L * D * N          (Mamba's hardware-aware count, as in VMamba)
    2D scan:  9 * B * L * D * N + 6 * B * L * D * N   (the second, vertical pass and its state products)
    D skip:   + B * D * L                z gate: + B * D * L

A scan is 2D when both H and W exceed 1; a single row or column is the 1D scan (H = 1 is how the cross-1D scan and
the 1D MIL baselines call the op).

The public `selective_scan_2d` runs as many small tensor ops on the reference backend, which counters would either
miss or count as something else. `counted_selective_scan_2d` is a torch.library custom op that runs the same scan
(same backends, same result) but appears to `torch.jit` tracing (fvcore) and to `TorchDispatchMode`
(`torch.utils.flop_counter`) as a single node named `mamba2d_flops::selective_scan_2d`, with a fake kernel so that
counting also works on the meta device. It has no backward: it exists for forward-only analysis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .scan import selective_scan_2d

COUNTED_OP_NAME = "mamba2d_flops::selective_scan_2d"
SHAPE_ONLY = "shape_only"


def selective_scan_flops(
    batch: int, dim: int, height: int, width: int, d_state: int, with_D: bool = True, with_z: bool = False
) -> int:
    """Multiply-add count of one selective scan over a (batch, dim, height, width) input with `d_state` states."""
    per_state = batch * height * width * dim * d_state
    flops = 9 * per_state
    if height > 1 and width > 1:
        flops += 6 * per_state
    elementwise = batch * dim * height * width
    if with_D:
        flops += elementwise
    if with_z:
        flops += elementwise
    return flops


def scan_flops_from_shapes(
    u_shape: Sequence[int], B_shape: Sequence[int], with_D: bool, with_z: bool
) -> int:
    """`selective_scan_flops` from the op's input shapes: u (batch, dim, H, W) and B (batch, G, N, H, W)."""
    if len(u_shape) != 4 or len(B_shape) != 5:
        raise ValueError(
            f"scan_flops_from_shapes: expected u (batch, dim, H, W) and B (batch, G, N, H, W), got u {tuple(u_shape)} "
            f"and B {tuple(B_shape)}"
        )
    batch, dim, height, width = u_shape
    return selective_scan_flops(batch, dim, height, width, B_shape[2], with_D=with_D, with_z=with_z)


@torch.library.custom_op(COUNTED_OP_NAME, mutates_args=())
def counted_selective_scan_2d(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    directions: str,
    out_dtype: torch.dtype | None,
    backend: str,
) -> torch.Tensor:
    """`selective_scan_2d` as one opaque op. `directions` is one name or comma-separated names (one per group).

    `backend` is one of `selective_scan_2d`'s backends, or SHAPE_ONLY: return zeros of the right shape and dtype
    without scanning (FLOPs depend only on shapes, so counting need not pay for the CPU reference scan).
    """
    if backend == SHAPE_ONLY:
        return torch.zeros(u.shape, dtype=out_dtype or u.dtype, device=u.device)
    names = directions.split(",")
    return selective_scan_2d(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, names[0] if len(names) == 1 else names, out_dtype, backend
    )


@counted_selective_scan_2d.register_fake
def _counted_selective_scan_2d_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_dtype,
                                    backend):
    return u.new_empty(u.shape, dtype=out_dtype or u.dtype)


def counted_scan_call(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, direction="tl_hv", out_dtype=None,
    backend="auto",
) -> torch.Tensor:
    """Drop-in for `selective_scan_2d` (same signature) that routes the call through the opaque counted op."""
    directions = direction if isinstance(direction, str) else ",".join(direction)
    return torch.ops.mamba2d_flops.selective_scan_2d(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_dtype, backend
    )


def flop_counter_formula(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, z_shape, *args, **kwargs) -> int:
    """Formula for `torch.utils.flop_counter.FlopCounterMode(custom_mapping=...)`.

    FlopCounterMode counts a multiply-add as two FLOPs (a matmul of m x k by k x n is 2mkn), so this returns twice
    `selective_scan_flops` to stay in that convention.
    """
    return 2 * scan_flops_from_shapes(u_shape, B_shape, with_D=D_shape is not None, with_z=z_shape is not None)
