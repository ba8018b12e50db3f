"""Layer norm over the channels of channels-last maps on the short-row CUDA kernels of cuda_ops/layer_norm.cu
(NVRTC through CuPy, like the scan kernels), forward and backward.

PyTorch's layer-norm kernels give every row a block of 128 threads; on a channels-last feature map a row is one
pixel's 48-768 channels, so most of those threads idle and the map moves at a small fraction of the memory
bandwidth. The kernels here pack several rows into a warp and read and write each value once. When a gradient is
wanted the forward also writes each row's mean and 1/std (and, for an output of lower precision than the input, as
under autocast, the deviations from the mean rounded to the output's dtype, which the backward keeps instead of the
input: half the memory, with an error relative to the deviations rather than to the input). The backward reads the
kept input and the output's gradient once, writes the input's gradient in the input's dtype and leaves per-block
partial sums of the weight and bias gradients, which are summed in a fixed order (first-order gradients only;
`aten::native_layer_norm_backward` computes the same from the same statistics).
`usable` says whether a call may take the kernel (a CUDA tensor whose rows are contiguous, CuPy present, not under
torch.compile); everything else stays with F.layer_norm.
"""

from __future__ import annotations

import torch

from . import cuda_build
from .cuda_launch import (
    LayerNormBwdParams,
    LayerNormParams,
    compiled_kernels,
    cupy_importable,
    device_index,
    launch_kernel,
    make_params,
)

_kernels: dict[tuple[int, str], tuple[object]] = {}
_by_call: dict[tuple, object] = {}  # `_kernel`'s arguments -> the kernel


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


def add_layer_norm(rows: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None, rows_per_sample: int,
                   weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's residual sum and the next norm in one pass: (s = rows + scale * branch, layer_norm(s)),
    s in the dtype of `rows`, the norm as `layer_norm` gives it; differentiable (the backward adds s's two gradients
    and scales the branch's in the same pass). The caller checks `usable(rows, ...)` and that `branch` is
    contiguous and of the same shape.

    Args:
        rows: The residual stream, contiguous (samples * rows_per_sample, ..., C) on a CUDA device.
        branch: What is added to it, same shape, any kernel dtype (under autocast, the autocast dtype).
        scale: Per-sample factor of the branch (a drop path's kept / keep probability), float32 of shape
            (samples,), or None for 1.
        rows_per_sample: Rows of one sample (its pixels).
        weight: Per-channel scale of the norm, or None.
        bias: Per-channel shift of the norm, or None.
        eps: Added to the variance before the square root.
        out_dtype: The norm's output dtype.
    """
    tensors = (rows, branch, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _AddLayerNorm.apply(rows, branch, scale, rows_per_sample, weight, bias, eps, out_dtype)
    out, _, _, _, total = _forward(rows, weight, bias, eps, out_dtype, False, branch, scale, rows_per_sample)
    return total, out


def _forward(rows, weight, bias, eps, out_dtype, for_backward, branch=None, scale=None, rows_per_sample=1):
    """(output, mean, 1/std, input as kept for the backward, residual sum); the middle three are None unless
    `for_backward`, and the mean is None where the backward keeps the deviations from it (an output narrower than
    the input); the sum (what is normalised) is None without `branch`."""
    channels = rows.shape[-1]
    total = torch.empty_like(rows) if branch is not None else None
    out = torch.empty(rows.shape, dtype=out_dtype, device=rows.device)
    stats = [torch.empty((*rows.shape[:-1], 1), dtype=torch.float32, device=rows.device) if for_backward else None
             for _ in range(2)]
    lower = for_backward and out_dtype.itemsize < rows.dtype.itemsize
    deviations = torch.empty(rows.shape, dtype=out_dtype, device=rows.device) if lower else None
    fn = _kernel(rows.device, rows.dtype, out_dtype, channels, branch_dtype=None if branch is None else branch.dtype)
    w32, b32 = _float32(weight), _float32(bias)
    count = rows.numel() // channels
    lanes, _ = cuda_build.layer_norm_lanes(channels)
    threads = cuda_build.LAYER_NORM_THREADS
    params = make_params(LayerNormParams, x=rows, weight=w32, bias=b32, y=out, mean_out=stats[0], rstd_out=stats[1],
                         dev_low=deviations, branch=branch, scale=scale, x_out=total, rows=count,
                         rows_per_sample=rows_per_sample, C=channels, eps=eps)
    launch_kernel(fn, rows.device, (-(-count * lanes // threads), 1), threads, 0, params)
    if not for_backward:
        return out, None, None, None, total
    kept = total if total is not None else rows
    return (out, None, stats[1], deviations, total) if lower else (out, stats[0], stats[1], kept, total)


def _backward(grad_out, rows, weight, mean, rstd, input_dtype, grad_total=None, branch_dtype=None, scale=None,
              rows_per_sample=1):
    """(input, weight, bias, branch) gradients of the forward that kept `rows` (in its dtype; the deviations from the
    mean where `mean` is None) and the statistics; weight and bias as float32 sums over the rows, in a fixed order.
    The norm of a residual sum adds the sum's other gradient `grad_total` to the input's and returns the branch's
    (`branch_dtype`, scaled per sample), else None; without a scale and in the input's dtype that is the input's
    gradient itself."""
    channels = rows.shape[-1]
    count = rows.numel() // channels
    lanes, values = cuda_build.layer_norm_lanes(channels)
    threads = cuda_build.LAYER_NORM_THREADS
    blocks = max(1, min(cuda_build.LAYER_NORM_BWD_MAX_BLOCKS, -(-count * lanes // threads)))
    d_rows = torch.empty(rows.shape, dtype=input_dtype, device=rows.device)
    parts = torch.empty((2, blocks, channels), dtype=torch.float32, device=rows.device)
    w32 = _float32(weight)
    separate = branch_dtype is not None and (scale is not None or branch_dtype != input_dtype)
    d_branch = torch.empty(rows.shape, dtype=branch_dtype, device=rows.device) if separate else None
    params = make_params(LayerNormBwdParams, x=rows, dy=_dense(grad_out, rows.dtype), weight=w32, mean=mean,
                         rstd=rstd, dx=d_rows, dw_part=parts[0], db_part=parts[1],
                         dres=None if grad_total is None else _dense(grad_total, input_dtype),
                         dbranch=d_branch, scale=scale, rows=count, rows_per_sample=rows_per_sample, C=channels)
    fn = _kernel(rows.device, input_dtype, rows.dtype, channels, backward=True,
                 branch_dtype=branch_dtype if separate else None)
    launch_kernel(fn, rows.device, (blocks, 1), threads, 2 * 4 * threads * values, params)
    d_weight, d_bias = parts.sum(dim=1)
    if branch_dtype is not None and d_branch is None:
        d_branch = d_rows
    return d_rows, d_weight, d_bias, d_branch


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    """A weight or bias as the kernels read it, float32 and contiguous: the tensor itself where it is so already
    (the kernel takes its address; a detach or a cast that leaves it as it is would be one more operator for the host
    to dispatch, twice per norm and step)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.detach().to(torch.float32).contiguous()


def _dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, contiguous: `t` itself where it is both already."""
    return t.contiguous() if t.dtype == dtype else t.to(dtype).contiguous()


def _as_dtype_of(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A float32 parameter gradient in its parameter's dtype, cast only where they differ."""
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, bias, eps, out_dtype):
        out, mean, rstd, kept, _ = _forward(rows, weight, bias, eps, out_dtype, for_backward=True)
        ctx.save_for_backward(kept, weight, bias, mean, rstd)
        ctx.input_dtype = rows.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        rows, weight, bias, mean, rstd = ctx.saved_tensors
        d_rows, d_weight, d_bias, _ = _backward(grad_out, rows, weight, mean, rstd, ctx.input_dtype)
        d_weight = _as_dtype_of(d_weight, weight) if weight is not None and ctx.needs_input_grad[1] else None
        d_bias = _as_dtype_of(d_bias, bias) if bias is not None and ctx.needs_input_grad[2] else None
        return d_rows if ctx.needs_input_grad[0] else None, d_weight, d_bias, None, None


class _AddLayerNorm(torch.autograd.Function):
    """`add_layer_norm`'s autograd: its two outputs, the residual sum and its norm, have one backward pass."""

    @staticmethod
    def forward(ctx, rows, branch, scale, rows_per_sample, weight, bias, eps, out_dtype):
        out, mean, rstd, kept, total = _forward(rows, weight, bias, eps, out_dtype, True, branch, scale,
                                                rows_per_sample)
        ctx.save_for_backward(kept, weight, bias, mean, rstd, scale)
        ctx.input_dtype, ctx.branch_dtype, ctx.rows_per_sample = rows.dtype, branch.dtype, rows_per_sample
        return total, out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_out):
        kept, weight, bias, mean, rstd, scale = ctx.saved_tensors
        if grad_out is None:  # the norm went unused: the sum's gradient alone
            grad_out = torch.zeros(kept.shape, dtype=kept.dtype, device=kept.device)
        d_rows, d_weight, d_bias, d_branch = _backward(grad_out, kept, weight, mean, rstd, ctx.input_dtype,
                                                       grad_total, ctx.branch_dtype, scale, ctx.rows_per_sample)
        d_weight = _as_dtype_of(d_weight, weight) if weight is not None and ctx.needs_input_grad[4] else None
        d_bias = _as_dtype_of(d_bias, bias) if bias is not None and ctx.needs_input_grad[5] else None
        return (d_rows if ctx.needs_input_grad[0] else None, d_branch if ctx.needs_input_grad[1] else None, None,
                None, d_weight, d_bias, None, None)


def _kernel(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype, channels: int, backward: bool = False,
            branch_dtype: torch.dtype | None = None):
    """The forward of an input of `dtype` with an output of `out_dtype`, or (`backward`) the backward of an input
    of `dtype` kept in `out_dtype`, for rows of `channels` values; with `branch_dtype`, the variant of a residual
    sum's norm whose branch has that dtype. Looked up by these arguments (every norm of a step asks, twice)."""
    index = device_index(device)
    key = (index, dtype, out_dtype, channels, backward, branch_dtype)
    fn = _by_call.get(key)
    if fn is None:
        in_tag, out_tag = cuda_build.DTYPE_TAGS[dtype], cuda_build.DTYPE_TAGS[out_dtype]
        branch_tag = None if branch_dtype is None else cuda_build.DTYPE_TAGS[branch_dtype]
        name = (cuda_build.layer_norm_bwd_kernel_name(out_tag, in_tag, channels, branch_tag) if backward
                else cuda_build.layer_norm_kernel_name(in_tag, out_tag, channels, branch_tag))
        fn = _by_call[key] = compiled_kernels(_kernels, (index, name), index, cuda_build.LAYER_NORM_SOURCE,
                                              lambda: [name])[0]
    return fn
