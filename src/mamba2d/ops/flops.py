"""FLOP formula of the selective scan, registered with `torch.utils.flop_counter` on the scan's custom ops.

Counting convention (VMamba's tables, 2DVMamba's paper): one multiply-add is one FLOP. For a scan over
B batches, D channels, N states and L = H * W positions

    1D scan:  9 * B * L * D * N          (Mamba's hardware-aware count, as in VMamba)
    2D scan:  9 * B * L * D * N + 6 * B * L * D * N   (the second, vertical pass and its state products)
    D skip:   + B * D * L                z gate: + B * D * L
    low-rank delta (delta_proj, rank R):  + B * L * D * R   (the product that expands it, run inside the op)

A scan is 2D when both H and W exceed 1; a single row or column is the 1D scan (H = 1 is how the cross-1D scan and
the 1D MIL baselines call the op).

`torch.utils.flop_counter.FlopCounterMode` counts the operators it sees at dispatch, by the formulas registered for
them. The scan's formula is registered (`register_flop_formula`) on two custom ops:

- `mamba2d::scan2d_fwd`, the CUDA kernels' op (`mamba2d.ops.library`);
- `mamba2d_flops::selective_scan_2d`, the shape-only scan: `selective_scan_2d(..., backend="shape_only")` returns
  zeros of the output's shape and dtype through this one op, which has a fake kernel. A model built with
  `scan_backend="shape_only"` is therefore counted in one forward pass on any device, without running a scan.

The reference backend runs as many small tensor ops, which a counter would miss or count as something else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from . import library  # noqa: F401  (registers mamba2d::scan2d_fwd, whose formula is set below)
from .contract import check_scan_inputs, parse_directions, summed_channels

COUNTED_OP_NAME = "mamba2d_flops::selective_scan_2d"
SHAPE_ONLY = "shape_only"


def selective_scan_flops(
    batch: int, dim: int, height: int, width: int, d_state: int, with_D: bool = True, with_z: bool = False
) -> int:
    """Multiply-add count of one selective scan over a (batch, dim, height, width) input with `d_state` states.

    Args:
        batch: Batch size.
        dim: Channels.
        height: Map height (1 for a 1D scan).
        width: Map width.
        d_state: States per channel (N).
        with_D: Whether the D skip term is added.
        with_z: Whether the z gate is applied.
    """
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
    delta_shape: Sequence[int], B_shape: Sequence[int], with_D: bool, with_z: bool,
    A_shape: Sequence[int] | None = None,
) -> int:
    """`selective_scan_flops` from the op's input shapes: delta (batch, dim, H, W) and B (batch, G, N, H, W).

    A low-rank delta (batch, G, R, H, W) (given with `delta_proj`) adds the product that expands it to
    (batch, dim, H, W), batch * dim * R * H * W multiply-adds: the op runs it, and a model that ran it outside
    (as a matmul the counter saw) counts the same total.

    Args:
        delta_shape: Shape of delta: one map per channel (u has fewer where the groups share it), or the low-rank
            (batch, G, R, H, W).
        B_shape: Shape of B.
        with_D: Whether D was given.
        with_z: Whether z was given.
        A_shape: Shape of A (dim, N): the channel count of a low-rank delta (unused for a full one).
    """
    low_rank = len(delta_shape) == 5
    if len(delta_shape) not in (4, 5) or len(B_shape) != 5 or (low_rank and (A_shape is None or len(A_shape) != 2)):
        raise ValueError(
            f"scan_flops_from_shapes: expected delta (batch, dim, H, W) or (batch, G, R, H, W) with A (dim, N), and "
            f"B (batch, G, N, H, W); got delta {tuple(delta_shape)}, A {A_shape and tuple(A_shape)} and B "
            f"{tuple(B_shape)}"
        )
    if not low_rank:
        batch, dim, height, width = delta_shape
        return selective_scan_flops(batch, dim, height, width, B_shape[2], with_D=with_D, with_z=with_z)
    batch, _, rank, height, width = delta_shape
    dim = A_shape[0]
    return (selective_scan_flops(batch, dim, height, width, B_shape[2], with_D=with_D, with_z=with_z)
            + batch * dim * rank * height * width)


@torch.library.custom_op(COUNTED_OP_NAME, mutates_args=())
def _shape_only_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    out_dtype: Optional[torch.dtype],
    delta_proj: Optional[torch.Tensor] = None,
    sum_groups: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    return torch.empty(_output_shape(u, A, B, sum_groups), dtype=out_dtype or u.dtype, device=u.device,
                       memory_format=_memory_format(channels_last)).zero_()


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _output_shape(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, sum_groups: bool) -> tuple[int, ...]:
    """(batch, dim, H, W) from A (dim, N) and B (batch, G, N, H, W): delta may be low-rank and u shared; when the
    groups' outputs are summed, `contract.summed_channels`."""
    dim = A.shape[0]
    return (B.shape[0], summed_channels(u.shape[1], dim, B.shape[1]) if sum_groups else dim, B.shape[3], B.shape[4])


@_shape_only_op.register_fake
def _shape_only_fake(u, delta, A, B, C, D, z, delta_bias, out_dtype, delta_proj=None, sum_groups=False,
                     channels_last=False):
    return torch.empty(_output_shape(u, A, B, sum_groups), dtype=out_dtype or u.dtype, device=u.device,
                       memory_format=_memory_format(channels_last))


def _shape_only_setup(ctx, inputs, output) -> None:
    ctx.like = [(t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else None
                for t in (*inputs[:8], None, *inputs[9:])]


def _shape_only_backward(ctx, grad):
    # Zero gradients, each a new contiguous tensor of its input's shape: the layouts the CUDA kernels allocate, so a
    # layout audit of a training step sees the model's own memory traffic and nothing of a scan.
    return tuple(None if like is None else torch.zeros(like[0], dtype=like[1], device=like[2]) for like in ctx.like)


_shape_only_op.register_autograd(_shape_only_backward, setup_context=_shape_only_setup)


def shape_only_scan(
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
    *,
    delta_proj: torch.Tensor | None = None,
    sum_groups: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """Zeros of the scan's output shape and dtype, through the one counted op `mamba2d_flops::selective_scan_2d`.

    The inputs are checked as the real scan checks them, so a model that would fail to scan fails to count too.
    FLOPs depend on shapes only, so counting need not pay for the CPU reference scan. Differentiable with zero
    gradients in the layouts the CUDA kernels give (contiguous, each input's shape): a training step of a model
    built with `scan_backend="shape_only"` shows the model's own memory traffic, as the layout tests audit it.

    Args:
        u: (batch, dim, H, W), or (batch, dim / G, H, W) shared by the groups.
        delta: (batch, dim, H, W), or (batch, G, R, H, W) with `delta_proj`.
        A: (dim, N).
        B: (batch, G, N, H, W).
        C: (batch, G, N, H, W).
        D: (dim,) or None.
        z: (batch, dim, H, W) or None.
        delta_bias: (dim,) or None.
        delta_softplus: Unused by the count (the real scan's flag).
        direction: One direction name or one per group (checked, unused by the count).
        out_dtype: Output dtype (default: u's).
        delta_proj: (G, dim / G, R) of a low-rank delta, or None (counted: the product that expands delta).
        sum_groups: The output is summed over the G groups, (batch, dim / G, H, W), or over each block's where the
            groups share u's blocks (u's shape).
        channels_last: The output is channels_last.
    """
    shape = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, out_dtype, delta_proj)
    parse_directions(direction, shape.groups)
    return torch.ops.mamba2d_flops.selective_scan_2d(u, delta, A, B, C, D, z, delta_bias, out_dtype, delta_proj,
                                                     bool(sum_groups), bool(channels_last))


@register_flop_formula([torch.ops.mamba2d_flops.selective_scan_2d, torch.ops.mamba2d.scan2d_fwd])
def flop_counter_formula(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, z_shape, *args, **kwargs) -> int:
    """The scan's formula in `torch.utils.flop_counter`'s convention, where a multiply-add is two FLOPs.

    Args:
        u_shape: Shape of u (unused: a shared u has fewer channels than the scan).
        delta_shape: Shape of delta, (batch, dim, H, W), or (batch, G, R, H, W) when low-rank.
        A_shape: Shape of A, (dim, N).
        B_shape: Shape of B.
        C_shape: Shape of C (unused).
        D_shape: Shape of D, None when absent.
        z_shape: Shape of z, None when absent.
        *args: The op's remaining arguments (unused).
        **kwargs: `out_shape` (unused).
    """
    # delta (or A, where delta is low-rank) has one map per channel also where the groups share u
    return 2 * scan_flops_from_shapes(delta_shape, B_shape, with_D=D_shape is not None, with_z=z_shape is not None,
                                      A_shape=A_shape)


__all__ = ["COUNTED_OP_NAME", "SHAPE_ONLY", "flop_counter_formula", "scan_flops_from_shapes", "selective_scan_flops",
           "shape_only_scan"]
