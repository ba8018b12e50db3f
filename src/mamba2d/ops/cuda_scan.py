"""CUDA backend of the 2D selective scan: NVRTC-compiled kernels (cuda_ops/scan2d.cu) launched through CuPy.

Kernels compile once per (device arch, input dtype, output dtype, variant) and are cached on disk by CuPy
(`CUPY_CACHE_DIR`); sizes and strides are kernel arguments. Launches (`cuda_launch`) go to PyTorch's current stream
of the tensors' device; every output and scratch buffer is allocated by PyTorch. This module holds the launchers
(`fwd_impl`, `bwd_impl`); the autograd-aware entry point, `mamba2d.ops.library.selective_scan_2d_cuda`, runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from . import cuda_build
from .cuda_launch import (  # noqa: F401  (INSTALL_HINT, cupy_importable: the public face of the CUDA backend)
    INSTALL_HINT,
    KernelArgs,
    compiled_kernels,
    cupy_importable,
    device_index,
    launch_kernel,
    require_cupy,
)

MAX_D_STATE = cuda_build.MAX_D_STATE
SUPPORTED_DTYPES = tuple(cuda_build.DTYPE_TAGS)

#: Testing hook: fill every output and scratch buffer with NaN before each launch (catches unwritten elements).
POISON_OUTPUTS = False

_kernels: dict[tuple[int, str, str, int, int, int, bool, int, bool], tuple[object, object]] = {}
_dirs_cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}


def supports(u: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether the kernels handle these inputs (used by backend='auto' to fall back to the reference)."""
    return u.dtype in SUPPORTED_DTYPES and B.dim() == 5 and 1 <= B.shape[2] <= MAX_D_STATE


# ----------------------------------------------------------------------------------------------------------------
# Compilation and launch


def _get_kernels(device: torch.device, dtype: torch.dtype, out_fp32: bool, cfg: cuda_build.LaunchConfig,
                 has_z: bool):
    index = device_index(device)
    in_tag, out_tag = cuda_build.variant_tags(dtype, out_fp32)
    split = cfg.parts > 1
    key = (index, in_tag, out_tag, cfg.R, cfg.K, cfg.layout, has_z, cfg.fwd_min_blocks, split)
    return compiled_kernels(
        _kernels, key, index, cuda_build.KERNEL_SOURCE,
        lambda: cuda_build.kernel_names(in_tag, out_tag, cfg.R, cfg.K, cfg.layout, has_z, cfg.fwd_min_blocks, split),
        cuda_build.COMPILE_OPTIONS + cuda_build.TUNING_OPTIONS,
    )


_wave_kernels: dict[tuple[int, str, str, int, bool, int], tuple[object, object]] = {}


def _get_wave_kernels(device: torch.device, dtype: torch.dtype, out_fp32: bool, states_per_lane: int, has_z: bool,
                      cluster: int = 1):
    index = device_index(device)
    in_tag, out_tag = cuda_build.variant_tags(dtype, out_fp32)
    return compiled_kernels(
        _wave_kernels, (index, in_tag, out_tag, states_per_lane, has_z, cluster), index, cuda_build.KERNEL_SOURCE,
        lambda: cuda_build.wave_kernel_names(in_tag, out_tag, states_per_lane, has_z, cluster),
        cuda_build.COMPILE_OPTIONS + cuda_build.TUNING_OPTIONS,
    )


@lru_cache(maxsize=None)
def _device_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


_INT32_MAX = 2**31 - 1


def _vector_flags(cfg: cuda_build.LaunchConfig, width: int, inputs) -> int:
    """The kernels' `vec` argument: bit 1 when a thread's K columns go out as one vector store (W a multiple of K;
    the launcher allocates the outputs contiguous), bit 0 when every input allows the same vector loads."""
    if cfg.K == 1 or width % cfg.K or not cuda_build.VECTOR_ACCESS:
        return 0
    for t in inputs:
        if t is not None and not _vector_loads_ok(t, cfg.K):
            return 2
    return 3


def _vector_loads_ok(t: torch.Tensor, k: int) -> bool:
    """K consecutive columns are one aligned access: unit column stride, the address and every other stride (of a
    dimension longer than one) multiples of K elements."""
    if t.data_ptr() % (k * t.element_size()):
        return False
    if t.is_contiguous():  # every stride a multiple of W, and the caller checked that K divides W
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


def _check_sizes(u: torch.Tensor, B: torch.Tensor, cfg) -> None:
    _, _, height, width = u.shape
    d_state = B.shape[2]
    worst = max(d_state * height * width, cfg.nbands * d_state * width)
    if worst > _INT32_MAX:
        raise ValueError(
            f"selective_scan_2d(backend='cuda'): N*H*W = {d_state}*{height}*{width} is too large for the CUDA "
            f"kernels (at most {_INT32_MAX})"
        )


def _dirs_tensor(codes: Sequence[int], device: torch.device) -> torch.Tensor:
    index = device_index(device)
    key = (index, tuple(codes))
    t = _dirs_cache.get(key)
    if t is None:
        t = torch.tensor(key[1], dtype=torch.int32, device=device)
        _dirs_cache[key] = t
    return t


def _checkpoints(ckv_n: int, ckh_n: int, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Float32 checkpoint buffers of these sizes, None for an empty one (the custom ops turn None into empty)."""
    ckv = like.new_empty((ckv_n,), dtype=torch.float32) if ckv_n else None
    ckh = like.new_empty((ckh_n,), dtype=torch.float32) if ckh_n else None
    return ckv, ckh


def _poison(*tensors) -> None:
    if POISON_OUTPUTS:
        for t in tensors:
            if t is not None and t.numel():
                t.fill_(float("nan"))


def _geometry(u: torch.Tensor, B: torch.Tensor, backward: bool = False):
    batch, dim, height, width = u.shape
    groups, d_state = B.shape[1], B.shape[2]
    return cuda_build.launch_config(batch, dim, height, width, groups, d_state, backward)


def saves_checkpoint(cfg: cuda_build.LaunchConfig, d_state: int) -> bool:
    """The per-band forward keeps its band checkpoints for backward only while they are no larger than u in float32
    (the wavefront forward's band tops always are: N / 32 floats per pixel at most)."""
    return d_state <= cfg.R


def fwd_impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32, save_ckpt, y_needed=True,
             rebuild=False):
    """Launch the forward kernel. Returns (y, ckv, ckh): what the backward restarts from, if `save_ckpt` asks for it
    and it is no larger than u in float32, or `rebuild` (the backward's recomputation): ckv the vertical states
    at each band start and ckh the row states at each tile start (None where the map is one tile) of the per-band
    kernels, or ckv the band tops and ckh None of the wavefront kernels.

    With the states split over blocks (cfg.parts > 1) the kernel writes one float32 partial y per part, without the
    z gate; they are summed here in a fixed order and gated after the sum."""
    batch, dim, height, width = u.shape
    groups, d_state = B.shape[1], B.shape[2]
    cfg = _geometry(u, B)
    _check_sizes(u, B, cfg)
    u, delta, z, B, C = (_fit_int32(t, n) for t, n in ((u, "u"), (delta, "delta"), (z, "z"), (B, "B"), (C, "C")))
    if cuda_build.uses_wave(batch, dim, height, width, groups, d_state):
        return _wave_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32,
                         rebuild or save_ckpt, y_needed)
    device = u.device
    split = cfg.parts > 1
    ckv_n, ckh_n = cuda_build.checkpoint_sizes(batch, dim, height, width, groups, d_state)
    out_dtype = torch.float32 if out_fp32 else u.dtype
    y = None
    if y_needed:
        y = u.new_empty((cfg.parts, batch, dim, height, width) if split else (batch, dim, height, width),
                        dtype=torch.float32 if split else out_dtype)
    keep = rebuild or (save_ckpt and saves_checkpoint(cfg, d_state))
    ckv, ckh = _checkpoints(ckv_n if keep else 0, ckh_n, u)
    _poison(y, ckv, ckh)
    kz = None if split else z
    fwd_fn, _ = _get_kernels(device, u.dtype, out_fp32 or split, cfg, kz is not None)
    args = KernelArgs()
    args.pointers(u, delta, kz, B, C, A, D, delta_bias, _dirs_tensor(directions, device), y, ckv, ckh)
    args.int32(dim, height, width, groups, d_state, int(bool(delta_softplus)))
    for t, ndim in ((u, 4), (delta, 4), (kz, 4), (B, 5), (C, 5)):
        args.strides(t, ndim)
    args.int32(cfg.S, cfg.WPM, cfg.CH, cfg.ntiles, cfg.nbands, cfg.states_per_part)
    args.int64(batch * dim)
    args.int32(_vector_flags(cfg, width, (u, delta, kz, B, C)))
    launch_kernel(fwd_fn, device, (cfg.blocks, cfg.parts), cfg.threads, cfg.smem_fwd, args)
    if split and y is not None:
        y = y.sum(dim=0)
        if z is not None:
            y = y.mul_(torch.nn.functional.silu(z.float()))
        y = y.to(out_dtype)
    return y, ckv, ckh


def _wave_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, directions, out_fp32, keep, y_needed):
    """The wavefront forward (cuda_build.uses_wave): y gated in the kernel, never split over states. Each band's
    last row is the next band's input; with `keep` every band's is kept (ckv) for the wavefront backward."""
    batch, dim, height, width = u.shape
    d_state = B.shape[2]
    device = u.device
    wave = cuda_build.wave_config(d_state)
    y = u.new_empty((batch, dim, height, width), dtype=torch.float32 if out_fp32 else u.dtype) if y_needed else None
    tops_n = batch * dim * (cuda_build.wave_band_tops(height, width, d_state) if keep else d_state * width)
    tops = u.new_empty((tops_n,), dtype=torch.float32) if height > 32 else None
    _poison(y, tops)
    fn, _ = _get_wave_kernels(device, u.dtype, out_fp32, wave.states_per_lane, z is not None)
    args = KernelArgs()
    args.pointers(u, delta, z, B, C, A, D, delta_bias, _dirs_tensor(directions, device), y, tops)
    args.int32(dim, height, width, B.shape[1], d_state, int(bool(delta_softplus)))
    for t, ndim in ((u, 4), (delta, 4), (z, 4), (B, 5), (C, 5)):
        args.strides(t, ndim)
    args.int32(int(keep))
    launch_kernel(fn, device, (batch * dim, 1), wave.threads, wave.smem(d_state), args)
    return y, (tops if keep else None), None


def _wave_bwd(dout, u, delta, A, B, C, D, z, delta_bias, tops, delta_softplus, directions):
    """The wavefront backward (cuda_build.uses_wave), from the forward's band tops (recomputed when absent). dB and
    dC come out of the kernel per cluster of channels (cuda_build.wave_cluster) in tile order; here they are summed
    over each group's clusters, in a fixed order, and gathered into place."""
    batch, dim, height, width = u.shape
    groups, d_state = B.shape[1], B.shape[2]
    device = u.device
    if height > 32 and (tops is None or tops.numel() == 0):
        _, tops, _ = _wave_fwd(u, delta, A, B, C, D, None, delta_bias, delta_softplus, directions, True, True, False)
    wave = cuda_build.wave_config(d_state)
    shape = (batch, dim, height, width)
    du = u.new_empty(shape, dtype=u.dtype)
    ddelta = u.new_empty(shape, dtype=u.dtype)
    dz = u.new_empty(shape, dtype=u.dtype) if z is not None else None
    tiles = cuda_build.wave_tile_elements(height, width, d_state)
    cluster = cuda_build.wave_cluster(dim, groups, _device_arch(device_index(device)))
    dBp = u.new_empty((batch, groups, dim // groups // cluster, tiles), dtype=torch.float32)
    dCp = torch.empty_like(dBp)
    dAp = u.new_empty((batch, dim, d_state), dtype=torch.float32)
    dDp = u.new_empty((batch, dim), dtype=torch.float32)
    dbp = u.new_empty((batch, dim), dtype=torch.float32)
    chunks = cuda_build.wave_chunks(height, width)
    # scratch: each lane's states at every chunk end of a band, and the column adjoint leaving a band's top row
    ck = u.new_empty((batch * dim * chunks * d_state * 64,), dtype=torch.float32)
    bot = u.new_empty((batch * dim * d_state * width,), dtype=torch.float32) if height > 32 else None
    _poison(du, ddelta, dz, dBp, dCp, dAp, dDp, dbp, ck, bot)
    _, fn = _get_wave_kernels(device, u.dtype, dout.dtype == torch.float32, wave.states_per_lane, z is not None,
                              cluster)
    args = KernelArgs()
    args.pointers(u, delta, z, dout, B, C, A, D, delta_bias, _dirs_tensor(directions, device), tops, ck, bot, du,
                  ddelta, dz, dBp, dCp, dAp, dDp, dbp)
    args.int32(dim, height, width, groups, d_state, int(bool(delta_softplus)))
    for t, ndim in ((u, 4), (delta, 4), (z, 4), (dout, 4), (B, 5), (C, 5)):
        args.strides(t, ndim)
    args.int32(chunks)
    launch_kernel(fn, device, (batch * dim, 1), wave.threads, wave.smem_bwd(d_state, z is not None), args)
    index = _wave_tile_index(B.shape, directions, device).expand(batch, -1, -1)
    dB, dC = ((t.sum(dim=2) if t.shape[2] > 1 else t.squeeze(2)).gather(2, index).view(B.shape).to(B.dtype)
              for t in (dBp, dCp))
    return du, ddelta, dAp.sum(dim=0), dB, dC, dDp.sum(dim=0), dz, dbp.sum(dim=0)


def _wave_tile_index(shape, directions: Sequence[int], device: torch.device) -> torch.Tensor:
    """(1, G, N * H * W) positions of each group's map pixels in the wavefront backward's dB / dC tiles."""
    _, _, d_state, height, width = shape
    return _wave_tile_index_on(device_index(device), height, width, d_state, tuple(directions))


@lru_cache(maxsize=16)  # a few shapes at a time (a slide's grid changes from slide to slide: computed on the GPU)
def _wave_tile_index_on(index: int, height: int, width: int, d_state: int, directions: tuple[int, ...]):
    device = torch.device("cuda", index)
    return torch.stack([cuda_build.wave_tile_index(height, width, d_state, code, device)
                        for code in directions]).unsqueeze(0)


def bwd_impl(dout, u, delta, A, B, C, D, z, delta_bias, ckv, ckh, delta_softplus, directions):
    """Launch the backward kernel (recomputing the checkpoints first when the forward did not keep them).

    With the states split over blocks the kernel writes float32 partials of du, ddelta, dD and d(delta_bias) per
    part, summed here in a fixed order; the z gate's gradients come from the summed forward output (recomputed with
    the checkpoints), outside the kernel."""
    batch, dim, height, width = u.shape
    groups, d_state = B.shape[1], B.shape[2]
    cfg = _geometry(u, B, backward=True)
    _check_sizes(u, B, cfg)
    u, delta, z, B, C, dout = (_fit_int32(t, n) for t, n in ((u, "u"), (delta, "delta"), (z, "z"), (B, "B"),
                                                              (C, "C"), (dout, "dout")))
    device = u.device
    if dout.dtype not in (torch.float32, u.dtype):
        raise TypeError(f"selective_scan_2d backward: gradient dtype {dout.dtype} is neither float32 nor {u.dtype}")
    if cuda_build.uses_wave(batch, dim, height, width, groups, d_state):
        return _wave_bwd(dout, u, delta, A, B, C, D, z, delta_bias, ckv, delta_softplus, directions)
    split = cfg.parts > 1
    shape = (batch, dim, height, width)
    kz, dz = z, None
    if ckv is None or ckv.numel() == 0 or (split and z is not None):
        y_pre, ckv, ckh = fwd_impl(u, delta, A, B, C, D, None, delta_bias, delta_softplus, directions, True, True,
                                   y_needed=split and z is not None, rebuild=True)
        if y_pre is not None:  # z gate of a split, y = y_pre * silu(z): its gradients here, the scan's below
            zf = z.float()
            sig = torch.sigmoid(zf)
            gout = dout.float()
            dz = (gout * y_pre * sig * (1.0 + zf * (1.0 - sig))).to(u.dtype)
            dout, kz = gout * (zf * sig), None  # not in place: gout may be the caller's dout
    if kz is not None:  # the kernel writes dz (a split's came from the summed output above)
        dz = u.new_empty(shape, dtype=u.dtype)
    out_fp32 = dout.dtype == torch.float32
    grad_shape, grad_dtype = ((cfg.parts, *shape), torch.float32) if split else (shape, u.dtype)
    du = u.new_empty(grad_shape, dtype=grad_dtype)
    ddelta = u.new_empty(grad_shape, dtype=grad_dtype)
    dBp = u.new_empty((batch, groups, cfg.cpg, d_state, height, width), dtype=torch.float32)
    dCp = torch.empty_like(dBp)
    dAp = u.new_empty((batch, dim, d_state), dtype=torch.float32)
    dDp = u.new_empty((cfg.parts, batch, dim), dtype=torch.float32)
    dbp = u.new_empty((cfg.parts, batch, dim), dtype=torch.float32)
    dck = u.new_empty((batch * dim * d_state * height,), dtype=torch.float32) if cfg.ntiles > 1 else None
    _poison(du, ddelta, dz if kz is not None else None, dBp, dCp, dAp, dDp, dbp, dck)
    _, bwd_fn = _get_kernels(device, u.dtype, out_fp32, cfg, kz is not None)
    args = KernelArgs()
    args.pointers(u, delta, kz, dout, B, C, A, D, delta_bias, _dirs_tensor(directions, device), ckv,
                  ckh if ckh is not None and ckh.numel() else None, dck, du, ddelta, dz if kz is not None else None,
                  dBp, dCp, dAp, dDp, dbp)
    args.int32(dim, height, width, groups, d_state, int(bool(delta_softplus)))
    for t, ndim in ((u, 4), (delta, 4), (kz, 4), (dout, 4), (B, 5), (C, 5)):
        args.strides(t, ndim)
    args.int32(cfg.S, cfg.WPM, cfg.CH, cfg.ntiles, cfg.nbands, cfg.states_per_part)
    args.int64(batch * dim)
    args.int32(_vector_flags(cfg, width, (u, delta, kz, dout, B, C)))
    launch_kernel(bwd_fn, device, (cfg.blocks, cfg.parts), cfg.threads, cfg.smem_bwd, args)
    # Fixed-order reductions of the per-block and per-part partial sums (no atomics: bitwise reproducible).
    if split:
        du, ddelta = du.sum(dim=0).to(u.dtype), ddelta.sum(dim=0).to(u.dtype)
    dB = (dBp.sum(dim=2) if cfg.cpg > 1 else dBp.squeeze(2)).to(B.dtype)
    dC = (dCp.sum(dim=2) if cfg.cpg > 1 else dCp.squeeze(2)).to(C.dtype)
    # every part sums the same dout * u for dD: part 0's
    return du, ddelta, dAp.sum(dim=0), dB, dC, dDp[0].sum(dim=0), dz, dbp.sum(dim=(0, 1))
