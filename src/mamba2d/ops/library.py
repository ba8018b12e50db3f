"""torch.library registration of the CUDA 2D selective scan: forward and backward custom ops, fake kernels, autograd.

`mamba2d::scan2d_fwd` returns (y, ckv, ckh): the output and the backward checkpoints (float32, flat: see
`cuda_scan.fwd_impl`). `mamba2d::scan2d_bwd` returns every input gradient. Both are
opaque to torch.compile (no graph break) and pass `torch.library.opcheck`. Registering needs no CuPy and no GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cuda_build


@torch.library.custom_op("mamba2d::scan2d_fwd", mutates_args=(), device_types="cuda")
def scan2d_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    directions: list[int],
    out_fp32: bool,
    save_ckpt: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from .cuda_scan import fwd_impl

    y, ckv, ckh = fwd_impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32, save_ckpt)
    return y, _tensor(ckv, u, torch.float32), _tensor(ckh, u, torch.float32)


def _tensor(t: Optional[Tensor], like: Tensor, dtype: torch.dtype) -> Tensor:
    """A custom op returns tensors: an empty one for a launcher's None (an absent checkpoint or gradient)."""
    return t if t is not None else like.new_empty((0,), dtype=dtype)


def _ckpt_numels(u: Tensor, B: Tensor, save_ckpt: bool) -> tuple[int, int]:
    from .cuda_scan import saves_checkpoint

    batch, dim, height, width = (int(s) for s in u.shape)
    groups, d_state = int(B.shape[1]), int(B.shape[2])
    ckv_n, ckh_n = cuda_build.checkpoint_sizes(batch, dim, height, width, groups, d_state)
    cfg = cuda_build.launch_config(batch, dim, height, width, groups, d_state)
    wave = cuda_build.uses_wave(batch, dim, height, width, groups, d_state)
    return (ckv_n if save_ckpt and (wave or saves_checkpoint(cfg, d_state)) else 0), ckh_n


@scan2d_fwd.register_fake
def _scan2d_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32, save_ckpt):
    ckv_n, ckh_n = _ckpt_numels(u, B, save_ckpt)
    y = u.new_empty(tuple(u.shape), dtype=torch.float32 if out_fp32 else u.dtype)
    return y, u.new_empty((ckv_n,), dtype=torch.float32), u.new_empty((ckh_n,), dtype=torch.float32)


@torch.library.custom_op("mamba2d::scan2d_bwd", mutates_args=(), device_types="cuda")
def scan2d_bwd(
    dout: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    ckv: Tensor,
    ckh: Tensor,
    delta_softplus: bool,
    directions: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .cuda_scan import bwd_impl

    du, ddelta, dA, dB, dC, dD, dz, dbias = bwd_impl(
        dout, u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_softplus, directions
    )
    return du, ddelta, dA, dB, dC, dD, _tensor(dz, u, u.dtype), dbias


@scan2d_bwd.register_fake
def _scan2d_bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_softplus, directions):
    shape = tuple(u.shape)
    dim = u.shape[1]
    f32 = torch.float32
    return (
        u.new_empty(shape),
        u.new_empty(shape),
        u.new_empty(tuple(A.shape), dtype=f32),
        B.new_empty(tuple(B.shape)),
        C.new_empty(tuple(C.shape)),
        u.new_empty((dim,), dtype=f32),
        u.new_empty(shape if z is not None else (0,)),
        u.new_empty((dim,), dtype=f32),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32, save_ckpt = inputs
    _, ckv, ckh = output
    ctx.mark_non_differentiable(ckv, ckh)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckv, ckh)
    ctx.delta_softplus = delta_softplus
    ctx.directions = list(directions)


def input_grads(saved: tuple, dy: Tensor, delta_softplus: bool, directions: list[int], bwd) -> tuple:
    """Gradients of scan2d_fwd's twelve inputs from its saved tensors; `bwd` runs the backward (the custom op, or
    the launcher directly on the eager fast path)."""
    u, delta, A, B, C, D, z, delta_bias, ckv, ckh = saved
    du, ddelta, dA, dB, dC, dD, dz, dbias = bwd(dy, u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_softplus,
                                                directions)
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if D is not None else None,
        dz if z is not None else None,
        dbias if delta_bias is not None else None,
        None,
        None,
        None,
        None,
    )


def _backward(ctx, dy, _dckv, _dckh):
    return input_grads(ctx.saved_tensors, dy, ctx.delta_softplus, ctx.directions, torch.ops.mamba2d.scan2d_bwd)


scan2d_fwd.register_autograd(_backward, setup_context=_setup_context)
