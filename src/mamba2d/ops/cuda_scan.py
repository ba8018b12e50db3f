"""CUDA backend of the 2D selective scan: NVRTC-compiled kernels (cuda_ops/scan2d_band.cu, scan2d_wave.cu) launched
through CuPy.

Kernels compile once per (device, kernel variant, compile options) and are cached on disk by CuPy
(`CUPY_CACHE_DIR`); sizes and strides travel in the kernels' parameter struct. Each launcher asks
`cuda_build.launch_plan` once for the call's plan (kernel, grid, buffer sizes) and follows it. Launches
(`cuda_launch`) go to PyTorch's current stream of the tensors' device; every output and scratch buffer is allocated
by PyTorch. This module holds the launchers (`fwd_impl`, `bwd_impl`); the autograd-aware entry point,
`mamba2d.ops.library.selective_scan_2d_cuda`, runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from . import cuda_build, cuda_layout
from .contract import ScanShape, summed_channels
from .cuda_build import DEFAULT_TUNING, LaunchPlan, ScanTuning
from .cuda_launch import (  # noqa: F401  (INSTALL_HINT, cupy_importable: the public face of the CUDA backend)
    INSTALL_HINT,
    ScanParams,
    compiled_kernels,
    cupy_importable,
    device_index,
    launch_kernel,
    make_params,
    require_cupy,
    stride_fields,
)

MAX_D_STATE = cuda_build.MAX_D_STATE
SUPPORTED_DTYPES = tuple(cuda_build.DTYPE_TAGS)

_kernels: dict[tuple[int, tuple[str, str], tuple[str, ...]], tuple[object, object]] = {}
_dirs_cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}


def supports(u: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether the kernels handle these inputs (used by backend='auto' to fall back to the reference).

    Args:
        u: The scan's input (its dtype must be one of SUPPORTED_DTYPES).
        B: The scan's B, (batch, G, N, H, W) with N up to MAX_D_STATE.
    """
    return u.dtype in SUPPORTED_DTYPES and B.dim() == 5 and 1 <= B.shape[2] <= MAX_D_STATE


# ----------------------------------------------------------------------------------------------------------------
# Compilation and planning


def _kernel(device: torch.device, plan: LaunchPlan):
    """The CuPy kernel `plan.kernel` on `device`, compiled with the other kernel of its variant."""
    index = device_index(device)
    fns = compiled_kernels(_kernels, (index, plan.kernels, plan.compile_options), index, plan.source,
                           lambda: plan.kernels, plan.compile_options)
    return fns[int(plan.backward)]


@lru_cache(maxsize=None)
def _device_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def plan_for(maps: torch.Tensor, B: torch.Tensor, *, backward: bool, has_z: bool, out_fp32: bool,
             tuning: ScanTuning = DEFAULT_TUNING) -> LaunchPlan:
    """The launch plan of a call on these tensors (a backward's on the architecture of the tensors' card: its
    clusters).

    Args:
        maps: A tensor of one map per channel, (batch, dim, H, W) in the scan's dtype: its delta (real or fake).
        B: The scan's B, (batch, G, N, H, W).
        backward: Plan the backward launch (else the forward).
        has_z: The z gate is given.
        out_fp32: Forward: y is float32; backward: the incoming gradient is float32.
        tuning: The kernels' knobs.
    """
    arch = _device_arch(device_index(maps.device)) if backward and maps.device.type == "cuda" else 0
    # plain ints (a fake tensor's sizes may be symbolic: int() specialises them, as the kernels need)
    sizes = (*map(int, maps.shape), int(B.shape[1]), int(B.shape[2]))
    key = (sizes, maps.dtype, backward, has_z, out_fp32, arch, tuning)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 1024:  # shapes that come and go (a slide's grid per slide): start over
            _plans.clear()
        plan = _plans[key] = cuda_build.launch_plan(ScanShape(*sizes), maps.dtype, backward=backward, has_z=has_z,
                                                    out_fp32=out_fp32, arch=arch, tuning=tuning)
    return plan


_plans: dict[tuple, LaunchPlan] = {}  # plan_for's memo: a plain tuple key is cheaper than launch_plan's cache


# ----------------------------------------------------------------------------------------------------------------
# Launch helpers

_INT32_MAX = 2**31 - 1


def _vector_flags(plan: LaunchPlan, inputs) -> int:
    """The kernels' `vec` field: bit 1 when a thread's K columns go out as one vector store (the plan allows it: W a
    multiple of K; the launcher allocates the outputs contiguous), bit 0 when every input allows the same vector
    loads."""
    if not plan.vector_cols:
        return 0
    for t in inputs:
        if t is not None and not _vector_loads_ok(t, plan.vector_cols):
            return 2
    return 3


def _vector_loads_ok(t: torch.Tensor, k: int) -> bool:
    """K consecutive columns are one aligned access: unit column stride, the address and every other stride (of a
    dimension longer than one) multiples of K elements."""
    if t.data_ptr() % (k * t.element_size()):
        return False
    if t.is_contiguous():  # every stride a multiple of W, and the plan checked that K divides W
        return True
    strides = t.stride()
    if strides[-1] != 1:
        return False
    for size, stride in zip(t.shape[:-1], strides[:-1]):
        if stride % k and size > 1:
            return False
    return True


def _in_map_span(t: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[2:], t.stride()[2:]))


def _fit_int32(t: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """The kernels index within one (batch, channel) map with 32-bit offsets: copy exotic layouts that overflow."""
    if t is None or (t.numel() <= _INT32_MAX and t.is_contiguous()) or _in_map_span(t) <= _INT32_MAX:
        return t
    t = t.contiguous()
    if _in_map_span(t) > _INT32_MAX:
        raise ValueError(f"selective_scan_2d(backend='cuda'): {name} has {t[0, 0].numel()} elements per map; "
                         f"the CUDA kernels support at most {_INT32_MAX}")
    return t


def _check_sizes(u: torch.Tensor, B: torch.Tensor, plan: LaunchPlan) -> None:
    if plan.largest_offset > _INT32_MAX:
        _, _, height, width = u.shape
        raise ValueError(
            f"selective_scan_2d(backend='cuda'): N*H*W = {B.shape[2]}*{height}*{width} is too large for the CUDA "
            f"kernels (at most {_INT32_MAX})"
        )


#: Direction codes that fit the parameter struct's 64-bit `dir_codes`, 3 bits each.
MAX_PACKED_DIRECTIONS = 21


def direction_fields(codes: Sequence[int], device: torch.device) -> dict:
    """The parameter fields that give each group its direction code: by value (`dir_codes`, `dir_period`) when the
    codes repeat with a period of at most MAX_PACKED_DIRECTIONS groups (one code for all, or one per group for up
    to 21 groups), else a device tensor of G codes (`dirs`, cached per device).

    By value, a launch reads no tensor of ours that outlives the call: CUDA-graph capture (torch.compile's
    "reduce-overhead" mode) checks that every tensor allocated in its memory pool is one of the graph's outputs.

    Args:
        codes: One `cuda_build.direction_code` (0-7) per group.
        device: The launch's CUDA device (for the tensor).
    """
    codes = tuple(codes)
    packed = _packed_directions(codes)
    if packed is not None:
        return dict(dirs=None, dir_codes=packed[0], dir_period=packed[1])
    key = (device_index(device), codes)
    t = _dirs_cache.get(key)
    if t is None:
        t = _dirs_cache[key] = torch.tensor(codes, dtype=torch.int32, device=device)
    return dict(dirs=t, dir_codes=0, dir_period=0)


@lru_cache(maxsize=None)  # a model has a few direction patterns; every launch asks again
def _packed_directions(codes: tuple[int, ...]) -> tuple[int, int] | None:
    """(dir_codes, dir_period) of codes that repeat within MAX_PACKED_DIRECTIONS groups, else None."""
    for period in range(1, min(len(codes), MAX_PACKED_DIRECTIONS) + 1):
        if all(code == codes[g % period] for g, code in enumerate(codes)):
            return sum(code << (3 * g) for g, code in enumerate(codes[:period])), period
    return None


def _checkpoints(ckv_n: int, ckh_n: int, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Float32 checkpoint buffers of these sizes, None for an empty one (the custom ops turn None into empty)."""
    ckv = like.new_empty((ckv_n,), dtype=torch.float32) if ckv_n else None
    ckh = like.new_empty((ckh_n,), dtype=torch.float32) if ckh_n else None
    return ckv, ckh


def group_sum(t: torch.Tensor, channels: int, channels_last: bool = False) -> torch.Tensor:
    """Channel maps (batch, G * channels, H, W) summed over the G groups, in a fixed order, in t's dtype (accumulated
    in float32): a shared u's gradient from the kernels' one du map per channel, or y summed over the groups
    (`sum_groups`).

    Args:
        t: (batch, G * channels, H, W), group-major channels.
        channels: Channels per group.
        channels_last: Return the sum channels_last, written so in the same pass (`cuda_layout`).
    """
    if channels_last:
        return cuda_layout.group_sum_channels_last(t, t.shape[1] // channels)
    if t.shape[1] == channels:
        return t
    # the dtype said: CUDA autocast runs a sum without one in float32, which would make y (and all that follows it)
    # float32 under fp16 / bf16 autocast, unlike the contract, the reference and the custom op's fake
    return t.unflatten(1, (t.shape[1] // channels, channels)).sum(dim=1, dtype=t.dtype)


def expand_groups(t: torch.Tensor, dim: int) -> torch.Tensor:
    """One map per channel of a group, (batch, dim / G, H, W), repeated for each of the G groups: (batch, dim, H, W)
    (a gradient of y summed over the groups, where a caller needs every channel's).

    Args:
        t: (batch, dim / G, H, W), or (batch, dim, H, W) (returned as is).
        dim: Channels of all groups.
    """
    return t if t.shape[1] == dim else t.repeat(1, dim // t.shape[1], 1, 1)


def _poison(enabled: bool, *tensors) -> None:
    """Fill every given buffer with NaN (a testing aid: an element a kernel fails to write then shows)."""
    if enabled:
        for t in tensors:
            if t is not None and t.numel():
                t.fill_(float("nan"))


def _common_fields(u, delta, z, B, C, A, D, delta_bias, directions, delta_softplus, dout=None) -> dict:
    """Parameter fields every scan kernel takes: inputs, sizes and strides. A u of fewer than dim channels holds
    blocks of dim / G maps that the groups share, group g reading block g % blocks (`su_g`, `u_period`), and so
    does a dout of fewer than dim channels, the gradient of y summed over the groups of each block (`so_g`,
    `o_period`)."""
    _, dim, height, width = delta.shape
    groups = B.shape[1]
    return dict(
        u=u, delta=delta, z=z, dout=dout, Bm=B, Cm=C, A=A, Dv=D, dbias=delta_bias,
        **direction_fields(directions, u.device), dim=dim, H=height, W=width, G=groups, N=B.shape[2],
        softplus=int(bool(delta_softplus)), **_block_fields("su_g", "u_period", u, dim, groups),
        **_block_fields("so_g", "o_period", dout, dim, groups),
        **stride_fields(("su", u, "bdhw"), ("sd", delta, "bdhw"), ("sz", z, "bdhw"), ("so", dout, "bdhw"),
                        ("sB", B, "bgnhw"), ("sC", C, "bgnhw")),
    )


def _block_fields(offset: str, period: str, t: torch.Tensor | None, dim: int, groups: int) -> dict:
    """The per-group offset and period fields of u or dout (`t`): blocks of dim / G maps shared by the groups where
    t has fewer than dim channels, one map per channel otherwise (or where t is None)."""
    if t is None or t.shape[1] == dim:
        return {offset: 0, period: 1}
    per_group = dim // groups
    return {offset: -per_group * t.stride(1), period: t.shape[1] // per_group}


def _band_fields(plan: LaunchPlan, nmaps: int, vector_inputs) -> dict:
    """Parameter fields of the per-band kernels: the work split and the vector-access flags."""
    cfg = plan.band
    return dict(S=cfg.S, WPM=cfg.WPM, CH=cfg.CH, ntiles=cfg.ntiles, nbands=cfg.nbands, NP=cfg.states_per_part,
                nmaps=nmaps, vec=_vector_flags(plan, vector_inputs))


def _pair_buffers(like: torch.Tensor, shape: tuple[int, ...], shared: bool):
    """(pair, first, second): two float32 buffers of `shape` for the kernels' partial sums of dB and dC; with
    `shared`, the halves of `pair`, one (2, *shape) buffer that `_pair_sums` reduces in one launch (else pair is
    None)."""
    if shared:
        pair = like.new_empty((2, *shape), dtype=torch.float32)
        return (pair, *pair.unbind(0))
    return None, like.new_empty(shape, dtype=torch.float32), like.new_empty(shape, dtype=torch.float32)


def _pair_sums(pair, first: torch.Tensor, second: torch.Tensor, reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """`reduce` of both buffers of `_pair_buffers`: one call on `pair` where there is one (reduce then sees a
    leading dimension of 2 and must keep it), else one per buffer."""
    if pair is not None:
        return reduce(pair).unbind(0)
    return reduce(first), reduce(second)


def _parameter_partials(like: torch.Tensor, parts: int, batch: int, dim: int, d_state: int, shared: bool):
    """(rows, dAp, dDp, dbp): float32 buffers for the kernels' per-image partial sums of dA (batch, dim, N) and of
    dD and d(delta_bias) (parts, batch, dim). With `shared`, one state and one part (a model's scans), they are the
    rows of `rows`, one (3, 1, batch, dim) buffer that `_parameter_sums` reduces in one launch (else rows is None)."""
    if shared and d_state == 1 and parts == 1:
        rows = like.new_empty((3, 1, batch, dim), dtype=torch.float32)
        return rows, rows[0, 0].unsqueeze(-1), rows[1], rows[2]
    return (None, like.new_empty((batch, dim, d_state), dtype=torch.float32),
            like.new_empty((parts, batch, dim), dtype=torch.float32),
            like.new_empty((parts, batch, dim), dtype=torch.float32))


def _parameter_sums(rows, dAp: torch.Tensor, dDp: torch.Tensor, dbp: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(dA, dD, d(delta_bias)) from `_parameter_partials`' buffers: dA and d(delta_bias) summed over the images
    (and parts), dD over part 0's images (every part sums the same dout * u)."""
    if rows is not None:
        dA, dD, dbias = rows.sum(dim=2).squeeze(1).unbind(0)
        return dA.unsqueeze(-1), dD, dbias
    return dAp.sum(dim=0), dDp[0].sum(dim=0), dbp.sum(dim=(0, 1))


# ----------------------------------------------------------------------------------------------------------------
# Launchers


def fwd_impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32, save_ckpt, y_needed=True,
             rebuild=False, *, sum_groups: bool = False, channels_last: bool = False,
             tuning: ScanTuning = DEFAULT_TUNING, poison: bool = False):
    """Launch the forward kernel. Returns (y, ckv, ckh): what the backward restarts from, if `save_ckpt` asks for it
    and the plan keeps it, or `rebuild` (the backward's recomputation): ckv the vertical states at each band start
    and ckh the row states at each tile start (None where the map is one tile) of the per-band kernels, or ckv the
    band tops and ckh None of the wavefront kernels.

    With the states split over blocks (plan.split) the kernel writes one float32 partial y per part, without the z
    gate; they are summed here in a fixed order and gated after the sum. The caller has checked the inputs
    (`contract.check_scan_inputs`) and cast A, D and delta_bias to contiguous float32.

    Args:
        u: Input, (batch, dim, H, W) or (batch, P * dim / G, H, W): P blocks shared by the groups, group g
            reading block g % P; contiguous or strided.
        delta: Step sizes, (batch, dim, H, W).
        A: State matrix, (dim, N) float32.
        B: Input projection, (batch, G, N, H, W) in u's dtype.
        C: Output projection, like B.
        D: Skip weights, (dim,) float32, or None.
        z: Gate, like delta, or None.
        delta_bias: (dim,) float32, or None.
        delta_softplus: Whether dt is `softplus(delta + delta_bias)`.
        directions: One `cuda_build.direction_code` per group.
        out_fp32: y is float32 (else u's dtype).
        save_ckpt: Keep the checkpoints for a backward (when the plan keeps them).
        y_needed: Allocate and write y (False: a rebuild of the checkpoints only).
        rebuild: Always return the checkpoints (the backward's recomputation).
        sum_groups: Return y summed over the G groups, (batch, dim / G, H, W), in y's dtype (over the groups of
            each block of a shared u: u's shape).
        channels_last: Return y channels_last (summed and laid out in one pass with `sum_groups`).
        tuning: The kernels' knobs.
        poison: Fill every output and scratch buffer with NaN first (tests).

    Returns:
        (y, ckv, ckh), y None unless `y_needed`.
    """
    y, ckv, ckh = _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32, save_ckpt,
                       y_needed, rebuild, tuning, poison)
    if y is not None and (sum_groups or channels_last):
        dim = delta.shape[1]
        y = group_sum(y, summed_channels(u.shape[1], dim, B.shape[1]) if sum_groups else dim, channels_last)
    return y, ckv, ckh


def _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32, save_ckpt, y_needed, rebuild,
         tuning, poison):
    plan = plan_for(delta, B, backward=False, has_z=z is not None, out_fp32=out_fp32, tuning=tuning)
    _check_sizes(delta, B, plan)
    u, delta, z, B, C = (_fit_int32(t, n) for t, n in ((u, "u"), (delta, "delta"), (z, "z"), (B, "B"), (C, "C")))
    if plan.wave:
        return _wave_fwd(plan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32,
                         rebuild or save_ckpt, y_needed, poison)
    batch, dim, height, width = delta.shape
    cfg, split = plan.band, plan.split
    out_dtype = torch.float32 if out_fp32 else u.dtype
    y = None
    if y_needed:
        y = u.new_empty((cfg.parts, batch, dim, height, width) if split else (batch, dim, height, width),
                        dtype=torch.float32 if split else out_dtype)
    keep = rebuild or (save_ckpt and plan.keeps_checkpoint)
    ckv, ckh = _checkpoints(plan.ckv_numel if keep else 0, plan.ckh_numel, u)
    _poison(poison, y, ckv, ckh)
    kz = z if plan.gate_in_kernel else None
    params = make_params(ScanParams, **_common_fields(u, delta, kz, B, C, A, D, delta_bias, directions,
                                                      delta_softplus),
                         y=y, ckv=ckv, ckh=ckh, **_band_fields(plan, batch * dim, (u, delta, kz, B, C)))
    launch_kernel(_kernel(u.device, plan), u.device, plan.grid, plan.threads, plan.smem, params)
    if split and y is not None:
        y = y.sum(dim=0)
        if z is not None:
            y = y.mul_(torch.nn.functional.silu(z.float()))
        y = y.to(out_dtype)
    return y, ckv, ckh


def _wave_fwd(plan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32, keep, y_needed,
              poison):
    """The wavefront forward: y gated in the kernel, never split over states. Each band's last row is the next
    band's input; with `keep` every band's is kept (ckv) for the wavefront backward."""
    batch, dim, height, width = delta.shape
    d_state = B.shape[2]
    y = u.new_empty((batch, dim, height, width), dtype=torch.float32 if out_fp32 else u.dtype) if y_needed else None
    tops_n = plan.ckv_numel if keep else batch * dim * d_state * width
    tops = u.new_empty((tops_n,), dtype=torch.float32) if height > 32 else None
    _poison(poison, y, tops)
    params = make_params(ScanParams, **_common_fields(u, delta, z, B, C, A, D, delta_bias, directions,
                                                      delta_softplus),
                         y=y, tops=tops, keep_tops=int(keep))
    launch_kernel(_kernel(u.device, plan), u.device, plan.grid, plan.threads, plan.smem, params)
    return y, (tops if keep else None), None


def _wave_bwd(plan, dout, u, delta, A, B, C, D, z, delta_bias, tops, delta_softplus, directions, tuning, poison,
              shared):
    """The wavefront backward, from the forward's band tops (recomputed when absent). dB and dC come out of the
    kernel per cluster of channels (plan.cluster) in tile order; here they are summed over each group's clusters,
    in a fixed order, and gathered into place. `shared`: as `bwd_impl`'s `shared_outputs`."""
    batch, dim, height, width = delta.shape
    groups, d_state = B.shape[1], B.shape[2]
    if height > 32 and (tops is None or tops.numel() == 0):
        _, tops, _ = fwd_impl(u, delta, A, B, C, D, None, delta_bias, delta_softplus, directions, True, True,
                              y_needed=False, tuning=tuning, poison=poison)
    shape = (batch, dim, height, width)
    du = u.new_empty(shape, dtype=u.dtype)
    ddelta = u.new_empty(shape, dtype=u.dtype)
    dz = u.new_empty(shape, dtype=u.dtype) if z is not None else None
    pair, dBp, dCp = _pair_buffers(u, (batch, groups, dim // groups // plan.cluster, plan.wave_tile_elements), shared)
    rows, dAp, dDp, dbp = _parameter_partials(u, 1, batch, dim, d_state, shared)
    # scratch: each lane's states at every chunk end of a band, and the column adjoint leaving a band's top row
    ck = u.new_empty((batch * dim * plan.wave_chunks * d_state * 64,), dtype=torch.float32)
    bot = u.new_empty((batch * dim * d_state * width,), dtype=torch.float32) if height > 32 else None
    _poison(poison, du, ddelta, dz, dBp, dCp, dAp, dDp, dbp, ck, bot)
    params = make_params(ScanParams, **_common_fields(u, delta, z, B, C, A, D, delta_bias, directions,
                                                      delta_softplus, dout),
                         tops=tops, ck=ck, bot=bot, du=du, ddelta=ddelta, dz=dz, dBp=dBp, dCp=dCp, dAp=dAp, dDp=dDp,
                         dbp=dbp, ck_chunks=plan.wave_chunks)
    launch_kernel(_kernel(u.device, plan), u.device, plan.grid, plan.threads, plan.smem, params)
    index = _wave_tile_index(B.shape, directions, u.device, plan.wave_cfg.steps)

    def in_place(t):  # (..., batch, G, clusters, tile) -> (..., batch, G, N, H, W), B's dtype
        t = t.sum(dim=-2) if t.shape[-2] > 1 else t.squeeze(-2)
        t = t.gather(-1, index.expand(*t.shape[:-1], index.shape[-1]))
        return t.view(*t.shape[:-1], *B.shape[2:]).to(B.dtype)

    dB, dC = _pair_sums(pair, dBp, dCp, in_place)
    dA, dD, dbias = _parameter_sums(rows, dAp, dDp, dbp)
    return group_sum(du, u.shape[1]), ddelta, dA, dB, dC, dD, dz, dbias


def _wave_tile_index(shape, directions: Sequence[int], device: torch.device, steps: int) -> torch.Tensor:
    """(1, G, N * H * W) positions of each group's map pixels in the wavefront backward's dB / dC tiles.

    Built on the GPU at every call, not cached: a cached tensor would outlive the call, which CUDA-graph capture
    (torch.compile's "reduce-overhead" mode) does not allow of a tensor allocated in its memory pool."""
    _, _, d_state, height, width = shape
    return torch.stack([cuda_build.wave_tile_index(height, width, d_state, code, device, steps)
                        for code in directions]).unsqueeze(0)


def bwd_impl(dout, u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_softplus, directions, *,
             tuning: ScanTuning = DEFAULT_TUNING, poison: bool = False, shared_outputs: bool = False):
    """Launch the backward kernel (recomputing the checkpoints first when the forward did not keep them).

    With the states split over blocks the kernel writes float32 partials of du, ddelta, dD and d(delta_bias) per
    part, summed here in a fixed order; the z gate's gradients come from the summed forward output (recomputed with
    the checkpoints), outside the kernel.

    Args:
        dout: Gradient of y, like delta, or of y summed over the groups (`fwd_impl`'s sum_groups; read by every
            group that shares its block), in float32 or u's dtype; a channels_last one is copied to NCHW first.
        u: Input, (batch, dim, H, W) or (batch, P * dim / G, H, W): P blocks shared by the groups, group g
            reading block g % P; contiguous or strided.
        delta: Step sizes, (batch, dim, H, W).
        A: State matrix, (dim, N) float32.
        B: Input projection, (batch, G, N, H, W) in u's dtype.
        C: Output projection, like B.
        D: Skip weights, (dim,) float32, or None.
        z: Gate, like delta, or None.
        delta_bias: (dim,) float32, or None.
        ckv: The forward's first checkpoint (`fwd_impl`), or None or empty to recompute it.
        ckh: The forward's second checkpoint, or None or empty.
        delta_softplus: Whether dt is `softplus(delta + delta_bias)`.
        directions: One `cuda_build.direction_code` per group.
        tuning: The kernels' knobs.
        poison: Fill every output and scratch buffer with NaN first (tests).
        shared_outputs: dB and dC may be views of one tensor, and so may dA, dD and d(delta_bias): their partial
            sums are then reduced in one launch per group of gradients instead of one per gradient. A custom op's
            outputs may not share storage.

    Returns:
        (du, ddelta, dA, dB, dC, dD, dz, d(delta_bias)); dz is None without z.

    Raises:
        TypeError: When dout is neither float32 nor u's dtype.
    """
    if dout.dtype not in (torch.float32, u.dtype):
        raise TypeError(f"selective_scan_2d backward: gradient dtype {dout.dtype} is neither float32 nor {u.dtype}")
    if dout.is_contiguous(memory_format=torch.channels_last) and not dout.is_contiguous():
        # the gradient of a channels_last y: the kernels read it one map at a time, which in this layout would take
        # a memory line per element
        dout = cuda_layout.to_nchw(dout)
    plan = plan_for(delta, B, backward=True, has_z=z is not None, out_fp32=dout.dtype == torch.float32,
                    tuning=tuning)
    _check_sizes(delta, B, plan)
    u, delta, z, B, C, dout = (_fit_int32(t, n) for t, n in ((u, "u"), (delta, "delta"), (z, "z"), (B, "B"),
                                                              (C, "C"), (dout, "dout")))
    if plan.wave:
        return _wave_bwd(plan, dout, u, delta, A, B, C, D, z, delta_bias, ckv, delta_softplus, directions, tuning,
                         poison, shared_outputs)
    batch, dim, height, width = delta.shape
    groups, d_state = B.shape[1], B.shape[2]
    cfg, split = plan.band, plan.split
    shape = (batch, dim, height, width)
    dz = None
    if ckv is None or ckv.numel() == 0 or (split and z is not None):
        y_pre, ckv, ckh = fwd_impl(u, delta, A, B, C, D, None, delta_bias, delta_softplus, directions, True, True,
                                   y_needed=split and z is not None, rebuild=True, tuning=tuning, poison=poison)
        if y_pre is not None:  # z gate of a split, y = y_pre * silu(z): its gradients here, the scan's below
            zf = z.float()
            sig = torch.sigmoid(zf)
            gout = expand_groups(dout, dim).float()
            dz = (gout * y_pre * sig * (1.0 + zf * (1.0 - sig))).to(u.dtype)
            dout = gout * (zf * sig)  # not in place: gout may be the caller's dout
    kz = z if plan.gate_in_kernel else None
    if kz is not None:  # the kernel writes dz (a split's came from the summed output above)
        dz = u.new_empty(shape, dtype=u.dtype)
    grad_shape, grad_dtype = ((cfg.parts, *shape), torch.float32) if split else (shape, u.dtype)
    du = u.new_empty(grad_shape, dtype=grad_dtype)
    ddelta = u.new_empty(grad_shape, dtype=grad_dtype)
    pair, dBp, dCp = _pair_buffers(u, (batch, groups, cfg.cpg, d_state, height, width), shared_outputs)
    rows, dAp, dDp, dbp = _parameter_partials(u, cfg.parts, batch, dim, d_state, shared_outputs)
    dck = u.new_empty((batch * dim * d_state * height,), dtype=torch.float32) if cfg.ntiles > 1 else None
    _poison(poison, du, ddelta, dz if kz is not None else None, dBp, dCp, dAp, dDp, dbp, dck)
    params = make_params(ScanParams, **_common_fields(u, delta, kz, B, C, A, D, delta_bias, directions,
                                                      delta_softplus, dout),
                         ckv=ckv, ckh=ckh if ckh is not None and ckh.numel() else None, dck=dck, du=du,
                         ddelta=ddelta, dz=dz if kz is not None else None, dBp=dBp, dCp=dCp, dAp=dAp, dDp=dDp,
                         dbp=dbp, **_band_fields(plan, batch * dim, (u, delta, kz, dout, B, C)))
    launch_kernel(_kernel(u.device, plan), u.device, plan.grid, plan.threads, plan.smem, params)
    # Fixed-order reductions of the per-block and per-part partial sums (no atomics: bitwise reproducible).
    if split:
        du, ddelta = du.sum(dim=0).to(u.dtype), ddelta.sum(dim=0).to(u.dtype)
    dB, dC = _pair_sums(pair, dBp, dCp, lambda t: (t.sum(dim=-4) if cfg.cpg > 1 else t.squeeze(-4)).to(B.dtype))
    dA, dD, dbias = _parameter_sums(rows, dAp, dDp, dbp)
    return group_sum(du, u.shape[1]), ddelta, dA, dB, dC, dD, dz, dbias
