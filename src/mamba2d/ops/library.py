"""The CUDA 2D selective scan as an autograd-aware op: `torch.library` custom ops for torch.compile, an
`autograd.Function` twin for eager calls, and the entry point `selective_scan_2d_cuda` that picks between them.

`mamba2d::scan2d_fwd` returns (y, ckv, ckh): the output and the backward checkpoints (float32, flat: see
`cuda_scan.fwd_impl`). `mamba2d::scan2d_bwd` returns every input gradient. Given a low-rank delta and its projection
(`delta_proj`), both ops expand the full delta themselves (`contract.full_delta`), so that autograd keeps only the
low-rank factors for the backward, which recomputes the full delta (as Mamba's fused mixer does). Both ops are
opaque to torch.compile (no graph break) and pass `torch.library.opcheck`. Both paths run the launchers of
`mamba2d.ops.cuda_scan`. Registering needs no CuPy and no GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from . import cuda_build
from .contract import batched_delta_factors, check_scan_inputs, full_delta, parse_directions, summed_channels
from .cuda_build import DEFAULT_TUNING, ScanTuning
from .cuda_scan import (
    MAX_D_STATE,
    SUPPORTED_DTYPES,
    bwd_impl,
    cupy_importable,
    fwd_impl,
    plan_for,
    require_cupy,
)


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
    delta_proj: Optional[Tensor] = None,
    sum_groups: bool = False,
    channels_last: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The scan's forward as a custom op (`mamba2d::scan2d_fwd`) on checked inputs (`selective_scan_2d_cuda`).

    Args:
        u: Input, (batch, dim, H, W) or (batch, P * dim / G, H, W): P blocks shared by the groups, group g
            reading block g % P; contiguous or strided.
        delta: Step sizes, (batch, dim, H, W), or (batch, G, R, H, W) with `delta_proj`.
        A: State matrix, (dim, N) float32.
        B: Input projection, (batch, G, N, H, W) in u's dtype.
        C: Output projection, like B.
        D: Skip weights, (dim,) float32, or None.
        z: Gate, (batch, dim, H, W), or None.
        delta_bias: (dim,) float32, or None.
        delta_softplus: Whether dt is `softplus(delta + delta_bias)`.
        directions: One `cuda_build.direction_code` per group.
        out_fp32: y is float32 (else u's dtype).
        save_ckpt: Keep the checkpoints for the backward.
        delta_proj: (G, dim / G, R) projecting a low-rank delta (`contract.full_delta`), or None.
        sum_groups: y is summed over the G groups, (batch, dim / G, H, W) (over each block's groups where the
            groups share u's blocks: u's shape).
        channels_last: y is channels_last.

    Returns:
        (y, ckv, ckh); an absent checkpoint is an empty float32 tensor.
    """
    y, ckv, ckh = fwd_impl(u, full_delta(delta, delta_proj), A, B, C, D, z, delta_bias, delta_softplus, directions,
                           out_fp32, save_ckpt, sum_groups=sum_groups, channels_last=channels_last)
    return y, _tensor(ckv, u, torch.float32), _tensor(ckh, u, torch.float32)


def _tensor(t: Optional[Tensor], like: Tensor, dtype: torch.dtype) -> Tensor:
    """A custom op returns tensors: an empty one for a launcher's None (an absent checkpoint or gradient)."""
    return t if t is not None else like.new_empty((0,), dtype=dtype)


def _maps_like(delta: Tensor, delta_proj: Optional[Tensor]) -> Tensor:
    """A tensor shaped like the full delta (batch, dim, H, W), for the fake kernels' plans and shapes."""
    if delta_proj is None:
        return delta
    return delta.new_empty((delta.shape[0], delta_proj.shape[0] * delta_proj.shape[1], *delta.shape[3:]))


@scan2d_fwd.register_fake
def _scan2d_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32, save_ckpt,
                     delta_proj=None, sum_groups=False, channels_last=False):
    maps = _maps_like(delta, delta_proj)
    plan = plan_for(maps, B, backward=False, has_z=z is not None, out_fp32=out_fp32)
    ckv_n = plan.ckv_numel if save_ckpt and plan.keeps_checkpoint else 0
    ckh_n = plan.ckh_numel
    batch, dim, height, width = maps.shape
    y_shape = (batch, summed_channels(u.shape[1], dim, B.shape[1]) if sum_groups else dim, height, width)
    y = torch.empty(y_shape, dtype=torch.float32 if out_fp32 else u.dtype, device=u.device,
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
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
    delta_proj: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The scan's backward as a custom op (`mamba2d::scan2d_bwd`).

    Args:
        dout: Gradient of y, (batch, dim, H, W), or y's summed shape for y summed over the groups, in float32 or
            u's dtype.
        u: Input, (batch, dim, H, W) or (batch, P * dim / G, H, W): P blocks shared by the groups, group g
            reading block g % P; contiguous or strided.
        delta: Step sizes, (batch, dim, H, W), or (batch, G, R, H, W) with `delta_proj`.
        A: State matrix, (dim, N) float32.
        B: Input projection, (batch, G, N, H, W) in u's dtype.
        C: Output projection, like B.
        D: Skip weights, (dim,) float32, or None.
        z: Gate, (batch, dim, H, W), or None.
        delta_bias: (dim,) float32, or None.
        ckv: The forward's first checkpoint (empty: recomputed).
        ckh: The forward's second checkpoint (may be empty).
        delta_softplus: Whether dt is `softplus(delta + delta_bias)`.
        directions: One `cuda_build.direction_code` per group.
        delta_proj: (G, dim / G, R) projecting a low-rank delta, or None.

    Returns:
        (du, ddelta, dA, dB, dC, dD, dz, d(delta_bias), d(delta_proj)); ddelta has delta's shape (low-rank or
        not), dz is empty without z and d(delta_proj) without delta_proj.
    """
    du, ddelta, dA, dB, dC, dD, dz, dbias, dproj = scan_bwd(
        dout, u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_softplus, directions, delta_proj
    )
    return du, ddelta, dA, dB, dC, dD, _tensor(dz, u, u.dtype), dbias, _tensor(dproj, u, u.dtype)


@scan2d_bwd.register_fake
def _scan2d_bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_softplus, directions,
                     delta_proj=None):
    shape = tuple(_maps_like(delta, delta_proj).shape)
    dim = A.shape[0]
    f32 = torch.float32
    return (
        u.new_empty(tuple(u.shape)),
        u.new_empty(tuple(delta.shape)),
        u.new_empty(tuple(A.shape), dtype=f32),
        B.new_empty(tuple(B.shape)),
        C.new_empty(tuple(C.shape)),
        u.new_empty((dim,), dtype=f32),
        u.new_empty(shape if z is not None else (0,)),
        u.new_empty((dim,), dtype=f32),
        delta_proj.new_empty(tuple(delta_proj.shape)) if delta_proj is not None else u.new_empty((0,)),
    )


def scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_softplus, directions, delta_proj, **launch):
    """`cuda_scan.bwd_impl` on a full delta or on a low-rank one, whose full delta it recomputes first.

    The gradients of a low-rank delta come from the full delta's, ddelta (batch, dim, H, W), per (image, group)
    GEMMs in delta's dtype: `delta_proj^T ddelta` for the low-rank delta, and `ddelta delta^T` for delta_proj,
    summed over the images in float32 (at least).

    Args:
        dout: Gradient of y.
        u: Input.
        delta: Step sizes, (batch, dim, H, W), or (batch, G, R, H, W) with `delta_proj`.
        A: State matrix.
        B: Input projection.
        C: Output projection.
        D: Skip weights, or None.
        z: Gate, or None.
        delta_bias: Added to delta before softplus, or None.
        ckv: The forward's first checkpoint.
        ckh: The forward's second checkpoint.
        delta_softplus: Whether dt is `softplus(delta + delta_bias)`.
        directions: One `cuda_build.direction_code` per group.
        delta_proj: (G, dim / G, R), or None.
        **launch: `tuning`, `poison` and `shared_outputs` for `bwd_impl`.

    Returns:
        `bwd_impl`'s (du, ddelta, dA, dB, dC, dD, dz, d(delta_bias)), ddelta in delta's shape, then d(delta_proj)
        (None without delta_proj).
    """
    if delta_proj is None:
        return (*bwd_impl(dout, u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_softplus, directions, **launch),
                None)
    weight, low_rank = batched_delta_factors(delta, delta_proj)
    batch, groups, rank, height, width = delta.shape
    full = torch.bmm(weight, low_rank).view(batch, -1, height, width)
    du, ddelta, dA, dB, dC, dD, dz, dbias = bwd_impl(dout, u, full, A, B, C, D, z, delta_bias, ckv, ckh,
                                                     delta_softplus, directions, **launch)
    del full  # the recomputed delta goes before the gradients' products allocate theirs
    maps = ddelta.view(batch * groups, -1, height * width)
    d_low_rank = torch.bmm(weight.transpose(1, 2), maps).view(delta.shape)
    # transposed, (R, dim / G) per matrix: an output whose rows are R apart would take unaligned kernels (see
    # batched_delta_factors); the sum over the images writes it back in delta_proj's layout
    d_proj = torch.bmm(low_rank, maps.transpose(1, 2)).view(batch, groups, rank, -1)
    summed = d_proj.new_empty(delta_proj.shape, dtype=torch.promote_types(d_proj.dtype, torch.float32))
    torch.sum(d_proj, dim=0, dtype=summed.dtype, out=summed.transpose(1, 2))
    return du, d_low_rank, dA, dB, dC, dD, dz, dbias, summed.to(delta_proj.dtype)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32, save_ckpt, delta_proj, _, _ = inputs
    _, ckv, ckh = output
    ctx.mark_non_differentiable(ckv, ckh)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_proj)
    ctx.delta_softplus = delta_softplus
    ctx.directions = list(directions)


def input_grads(saved: tuple, dy: Tensor, delta_softplus: bool, directions: list[int], bwd) -> tuple:
    """Gradients of scan2d_fwd's fifteen inputs from its saved tensors.

    Args:
        saved: The forward's saved (u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_proj): a low-rank delta
            and its projection, not the full delta.
        dy: Gradient of y (of its sum over the groups, (batch, dim / G, H, W), when the forward summed them).
        delta_softplus: Whether dt is `softplus(delta + delta_bias)`.
        directions: One `cuda_build.direction_code` per group.
        bwd: Runs the backward: the custom op, or `scan_bwd` directly on the eager fast path.

    Returns:
        One gradient per input of scan2d_fwd, None for an absent optional tensor and for the flags.
    """
    u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_proj = saved
    du, ddelta, dA, dB, dC, dD, dz, dbias, dproj = bwd(dy, u, delta, A, B, C, D, z, delta_bias, ckv, ckh,
                                                       delta_softplus, directions, delta_proj)
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
        dproj if delta_proj is not None else None,
        None,
        None,
    )


def _backward(ctx, dy, _dckv, _dckh):
    return input_grads(ctx.saved_tensors, dy, ctx.delta_softplus, ctx.directions, torch.ops.mamba2d.scan2d_bwd)


scan2d_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_2d_cuda(
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
    tuning: ScanTuning = DEFAULT_TUNING,
    poison_outputs: bool = False,
    delta_proj: torch.Tensor | None = None,
    sum_groups: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """The 2D selective scan (docs/scan.md) on the CUDA kernels (same signature and errors as the reference).

    Under CUDA autocast, u, delta, B, C and z are cast to the autocast dtype (A, D, delta_bias stay float32) and the
    output has that dtype unless `out_dtype` says otherwise; a low-rank delta is expanded in that dtype (what a
    matmul of delta_proj and delta under autocast gives), its weight cast inside the op, whose gradient has the
    weight's dtype.

    Args:
        u: Input, (batch, dim, H, W) in float32, float16 or bfloat16, on a CUDA device, or (batch, P * dim / G,
            H, W): P blocks shared by the groups, group g reading block g % P.
        delta: Step sizes, (batch, dim, H, W) in u's dtype, or (batch, G, R, H, W) with `delta_proj`.
        A: State matrix, (dim, N) in float32, N up to MAX_D_STATE.
        B: Input projection, (batch, G, N, H, W) in u's dtype.
        C: Output projection, (batch, G, N, H, W) in u's dtype.
        D: Skip weights, (dim,) in float32, or None.
        z: Gate, (batch, dim, H, W) in u's dtype, or None.
        delta_bias: Added to delta before softplus, (dim,) in float32, or None.
        delta_softplus: Whether dt is `softplus(delta + delta_bias)`.
        direction: One of `DIRECTIONS` or one name per group.
        out_dtype: None (u's dtype) or torch.float32.
        tuning: the kernels' knobs (benchmarks and tests; the public op runs the defaults). Eager calls only: under
            torch.compile the custom ops run the defaults.
        poison_outputs: fill every output and scratch buffer with NaN before each launch, forward and backward, so
            that an element a kernel fails to write shows (tests). Eager calls only.
        delta_proj: Per-group projection (G, dim / G, R) of a low-rank delta, or None. The op keeps the low-rank
            delta and the weight for its backward, not the full delta.
        sum_groups: Return y summed over the G groups, (batch, dim / G, H, W) (over each block's groups where
            the groups share u's blocks: u's shape): the backward kernels then read its gradient's one map per
            channel of a group for every group, instead of a copy per group.
        channels_last: Return y channels_last (with `sum_groups`, summed and laid out in one pass).

    Returns:
        y, (batch, dim, H, W), or y summed with `sum_groups`.

    Raises:
        ValueError: Inputs off the GPU, N above MAX_D_STATE, or tuning/poisoning under torch.compile.
        TypeError: float64 inputs (the kernels take float32, float16 and bfloat16).
    """
    if not cupy_importable():
        require_cupy()
    if u.device.type != "cuda":
        raise ValueError(
            f"selective_scan_2d(backend='cuda'): u is on {u.device}, expected a CUDA tensor; "
            "move the inputs to a GPU or use backend='reference'"
        )
    if torch.is_autocast_enabled("cuda"):
        low = torch.get_autocast_dtype("cuda")

        def cast(t):
            return t if t is None or t.dtype == low or not t.is_floating_point() else t.to(low)

        u, delta, B, C, z = (cast(t) for t in (u, delta, B, C, z))
    shape = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, out_dtype, delta_proj)
    if u.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"selective_scan_2d(backend='cuda'): u has dtype {u.dtype}; the CUDA kernels take float32, float16 or "
            "bfloat16 (use backend='reference' for float64)"
        )
    if shape.d_state > MAX_D_STATE:
        raise ValueError(
            f"selective_scan_2d(backend='cuda'): B/C have N={shape.d_state} states (B.shape[2]); "
            f"the CUDA kernels support N <= {MAX_D_STATE}"
        )
    codes = tuple(cuda_build.direction_code(name) for name in parse_directions(direction, shape.groups))
    out_fp32 = (out_dtype or u.dtype) == torch.float32
    A32, D32, bias32 = (t if t is None or (t.dtype == torch.float32 and t.is_contiguous())
                        else t.to(torch.float32).contiguous() for t in (A, D, delta_bias))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, delta_proj)
    )
    if torch.compiler.is_compiling():
        if tuning is not DEFAULT_TUNING or poison_outputs:
            raise ValueError("selective_scan_2d_cuda: tuning and poison_outputs apply to eager calls only; under "
                             "torch.compile the custom ops run the default tuning")
        return torch.ops.mamba2d.scan2d_fwd(u, delta, A32, B, C, D32, z, bias32, bool(delta_softplus), codes, out_fp32,
                                            needs_grad, delta_proj, bool(sum_groups), bool(channels_last))[0]
    if not needs_grad:  # nothing to record: the launcher alone (an autograd.Function costs host time)
        return fwd_impl(u, full_delta(delta, delta_proj), A32, B, C, D32, z, bias32, bool(delta_softplus), codes,
                        out_fp32, False, sum_groups=bool(sum_groups), channels_last=bool(channels_last), tuning=tuning,
                        poison=poison_outputs)[0]
    return _EagerScan2d.apply(u, delta, A32, B, C, D32, z, bias32, delta_proj,
                              (bool(delta_softplus), codes, out_fp32, bool(sum_groups), bool(channels_last), tuning,
                               poison_outputs))


class _EagerScan2d(torch.autograd.Function):
    """Eager-mode twin of the mamba2d::scan2d_fwd/bwd custom ops: the same launchers without the custom-op dispatch
    and its per-call checks (host time per call). torch.compile traces the custom ops instead. The flags travel as
    one argument (`options`: delta_softplus, direction codes, out_fp32, sum_groups, channels_last, tuning,
    poison_outputs): each argument of `apply` costs host time."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_proj, options):
        delta_softplus, directions, out_fp32, summed, channels_last, tuning, poison = options
        y, ckv, ckh = fwd_impl(u, full_delta(delta, delta_proj), A, B, C, D, z, delta_bias, delta_softplus,
                               directions, out_fp32, True, sum_groups=summed, channels_last=channels_last,
                               tuning=tuning, poison=poison)
        # a low-rank delta is kept as it came (with its weight), never the full delta: the backward recomputes it
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_proj)
        ctx.delta_softplus, ctx.directions, ctx.tuning, ctx.poison = delta_softplus, directions, tuning, poison
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        def bwd(*args):
            return scan_bwd(*args, tuning=ctx.tuning, poison=ctx.poison, shared_outputs=True)

        grads = input_grads(ctx.saved_tensors, dy, ctx.delta_softplus, ctx.directions, bwd)
        return (*grads[:8], grads[12], None)  # the eight tensor inputs, delta_proj, then `options`
