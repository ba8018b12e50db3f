"""Layer norm over the channels of channels-last maps on the short-row CUDA kernel of cuda_ops/layer_norm.cu
(NVRTC through CuPy, like the scan kernels), with PyTorch's own layer-norm backward.

PyTorch's layer-norm kernel gives every row a block of 128 threads; on a channels-last feature map a row is one
pixel's 48-768 channels, so most of those threads idle and the map moves at a small fraction of the memory
bandwidth. The kernel here packs several rows into a warp and reads and writes each value
once. When a gradient is wanted it also writes each row's mean and 1/std (and, for an output of lower precision
than the input, as under autocast, the input rounded to the output's dtype, which the backward keeps instead of the
input: half the memory), and the backward is `aten::native_layer_norm_backward`, the kernel F.layer_norm's autograd
runs (first-order gradients only).
`usable` says whether a call may take the kernel (a CUDA tensor whose rows are contiguous, CuPy present, not under
torch.compile); everything else stays with F.layer_norm.
"""

from __future__ import annotations

import torch

from . import cuda_build
from .cuda_launch import LayerNormParams, compiled_kernels, cupy_importable, device_index, launch_kernel, make_params

_kernels: dict[tuple[int, str, str, tuple[int, int]], object] = {}


def usable(rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether layer_norm(rows, ...) over the last dimension can run on the kernel.

    Args:
        rows: The input, normalised over its last dimension.
        weight: Per-channel scale, or None.
        bias: Per-channel shift, or None.
    """
    channels = rows.shape[-1] if rows.dim() else 0
    if not (rows.is_cuda and rows.dtype in cuda_build.DTYPE_TAGS and 0 < channels <= cuda_build.LAYER_NORM_MAX_C
            and rows.is_contiguous() and rows.numel() > 0):
        return False
    if any(t is not None and (t.device != rows.device or t.shape != (channels,)) for t in (weight, bias)):
        return False
    return not torch.compiler.is_compiling() and cupy_importable()


def layer_norm(rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               out_dtype: torch.dtype) -> torch.Tensor:
    """F.layer_norm over the last dimension of `rows` (statistics in float32, weight and bias applied in float32),
    output in `out_dtype`; differentiable. The caller checks `usable` first.

    Args:
        rows: The input, contiguous on a CUDA device, at most LAYER_NORM_MAX_C values per row.
        weight: Per-channel scale of shape (C,), or None.
        bias: Per-channel shift of shape (C,), or None.
        eps: Added to the variance before the square root.
        out_dtype: The output's dtype (under autocast, lower than the input's).
    """
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, weight, bias))
    if wants_grad:
        return _LayerNorm.apply(rows, weight, bias, eps, out_dtype)
    return _forward(rows, weight, bias, eps, out_dtype, for_backward=False)[0]


def _forward(rows, weight, bias, eps, out_dtype, for_backward):
    """(output, mean, 1/std, input as kept for the backward); the last three are None unless `for_backward`."""
    channels = rows.shape[-1]
    out = torch.empty(rows.shape, dtype=out_dtype, device=rows.device)
    stats = [torch.empty((*rows.shape[:-1], 1), dtype=torch.float32, device=rows.device) if for_backward else None
             for _ in range(2)]
    lower = for_backward and out_dtype.itemsize < rows.dtype.itemsize
    rows_low = torch.empty(rows.shape, dtype=out_dtype, device=rows.device) if lower else None
    fn = _kernel(rows.device, rows.dtype, out_dtype, channels)
    w32, b32 = (None if t is None else t.detach().to(torch.float32).contiguous() for t in (weight, bias))
    count = rows.numel() // channels
    lanes, _ = cuda_build.layer_norm_lanes(channels)
    threads = cuda_build.LAYER_NORM_THREADS
    params = make_params(LayerNormParams, x=rows, weight=w32, bias=b32, y=out, mean_out=stats[0], rstd_out=stats[1],
                         x_low=rows_low, rows=count, C=channels, eps=eps)
    launch_kernel(fn, rows.device, (-(-count * lanes // threads), 1), threads, 0, params)
    return out, stats[0], stats[1], (rows_low if lower else rows) if for_backward else None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, bias, eps, out_dtype):
        out, mean, rstd, kept = _forward(rows, weight, bias, eps, out_dtype, for_backward=True)
        ctx.save_for_backward(kept, weight, bias, mean, rstd)
        ctx.input_dtype = rows.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        rows, weight, bias, mean, rstd = ctx.saved_tensors
        # PyTorch's backward wants one dtype: the kept input's (what F.layer_norm would have been called with)
        weight_c, bias_c = (None if t is None else t.to(rows.dtype) for t in (weight, bias))
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        d_rows, d_weight, d_bias = torch.ops.aten.native_layer_norm_backward(
            grad_out.to(rows.dtype).contiguous(), rows, [rows.shape[-1]], mean, rstd, weight_c, bias_c, mask)
        d_rows = d_rows.to(ctx.input_dtype) if d_rows is not None else None
        d_weight = d_weight.to(weight.dtype) if d_weight is not None else None
        d_bias = d_bias.to(bias.dtype) if d_bias is not None else None
        return d_rows, d_weight, d_bias, None, None


def _kernel(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype, channels: int):
    index = device_index(device)
    in_tag, out_tag = cuda_build.DTYPE_TAGS[dtype], cuda_build.DTYPE_TAGS[out_dtype]
    key = (index, in_tag, out_tag, cuda_build.layer_norm_lanes(channels))
    return compiled_kernels(
        _kernels, key, index, cuda_build.LAYER_NORM_SOURCE,
        lambda: [cuda_build.layer_norm_kernel_name(in_tag, out_tag, channels)])[0]
