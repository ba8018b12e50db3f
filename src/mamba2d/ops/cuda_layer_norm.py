"""Layer norm over the channels of channels-last maps, forward only, on the short-row CUDA kernel of
cuda_ops/layer_norm.cu (NVRTC through CuPy, like the scan kernels).

PyTorch's layer-norm kernel gives every row a block of 128 threads; on a channels-last feature map a row is one
pixel's 48-768 channels, so most of those threads idle (on an H100, a 128 x 112 x 112 x 48 float32 map took 2.4 ms,
a tenth of its memory bandwidth). The kernel here packs several rows into a warp and reads and writes each value
once. It has no backward: `usable` says whether a call may take it (no gradient wanted, a CUDA tensor whose rows
are contiguous, CuPy present, not under torch.compile); everything else stays with PyTorch.
"""

from __future__ import annotations

import torch

from . import cuda_build, cuda_scan

_kernels: dict[tuple[int, str, str, int], object] = {}


def usable(rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether layer_norm(rows, ...) over the last dimension can run on the kernel."""
    if not (rows.is_cuda and rows.dtype in cuda_build.DTYPE_TAGS and 0 < rows.shape[-1] <= cuda_build.LAYER_NORM_MAX_C
            and rows.is_contiguous() and rows.numel() > 0):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, weight, bias)):
        return False
    return not torch.compiler.is_compiling() and cuda_scan.cupy_importable()


def layer_norm(rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               out_dtype: torch.dtype) -> torch.Tensor:
    """F.layer_norm over the last dimension of `rows` (statistics in float32), output in `out_dtype`. The caller
    checks `usable` first."""
    channels = rows.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"layer_norm: {name} has shape {tuple(t.shape)}, expected ({channels},)")
    out = torch.empty(rows.shape, dtype=out_dtype, device=rows.device)
    fn = _kernel(rows.device, rows.dtype, out_dtype, channels)
    weight, bias = (None if t is None else t.detach().to(torch.float32).contiguous() for t in (weight, bias))
    count = rows.numel() // channels
    lanes, _ = cuda_build.layer_norm_lanes(channels)
    threads = cuda_build.LAYER_NORM_THREADS
    blocks = -(-count * lanes // threads)
    import numpy as np

    args = (*(cuda_scan.pointer_arg(t) for t in (rows, weight, bias, out)), np.int64(count), np.int32(channels),
            np.float32(eps))
    cuda_scan.launch_kernel(fn, rows.device, (blocks, 1), threads, 0, args)
    return out


def _kernel(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype, channels: int):
    index = device.index if device.index is not None else torch.cuda.current_device()
    in_tag, out_tag = cuda_build.DTYPE_TAGS[dtype], cuda_build.DTYPE_TAGS[out_dtype]
    key = (index, in_tag, out_tag, cuda_build.layer_norm_lanes(channels))
    fn = _kernels.get(key)
    if fn is None:
        cupy = cuda_scan.require_cupy()
        name = cuda_build.layer_norm_kernel_name(in_tag, out_tag, channels)
        with cuda_scan.compile_lock, cupy.cuda.Device(index):
            module = cupy.RawModule(code=cuda_build.kernel_source(cuda_build.LAYER_NORM_SOURCE),
                                    options=cuda_build.COMPILE_OPTIONS, name_expressions=[name])
            fn = _kernels.setdefault(key, module.get_function(name))
    return fn
