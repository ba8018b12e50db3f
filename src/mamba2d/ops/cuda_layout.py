"""Layout copies of (batch, channels, H, W) feature maps between channels_last and NCHW, and to and from the
column-major NCHW order VMamba's cross-scan reads, on the tiled CUDA kernel of cuda_ops/layout.cu (NVRTC through
CuPy, like the scan kernels); a 2D mixer's routes summed into channels_last (`group_sum_channels_last`); and its
SiLU written in both layouts (`silu_both_layouts`).

Each function returns what the PyTorch expression in its docstring returns, bit for bit; that expression is also
what runs wherever the kernel does not apply (a CPU tensor, a dtype other than float32 / float16 / bfloat16, an
input not in the layout the function converts from, no CuPy, or under torch.compile, whose generated code tiles
such copies itself). PyTorch's copy of a permuted tensor writes in the output's order and reads the input a whole
row apart per element; on the maps of a VSSM stage and beyond (millions of pixels) it moves a fraction of the
memory bandwidth, while the kernel reads and writes whole 128-byte lines through a shared-memory tile.
"""

from __future__ import annotations

import torch

from . import cuda_build
from .cuda_launch import (
    GroupSumParams,
    SiluParams,
    SwapParams,
    compiled_kernels,
    cupy_importable,
    device_index,
    launch_kernel,
    make_params,
)

_kernels: dict[tuple[int, str], tuple[object]] = {}
_MAX_BLOCKS = 2**31 - 1  # a 1-D grid's limit


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """`x.contiguous()`: a channels_last map's NCHW copy.

    Args:
        x: A (batch, channels, H, W) map.
    """
    if _applies(x, torch.channels_last, x.is_contiguous()):
        b, c, h, w = x.shape
        out = _swap(x, b, h * w, 1, c)
        if out is not None:
            return out.view(b, c, h, w)
    return x.contiguous()


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x.contiguous(memory_format=torch.channels_last)`: an NCHW map's channels_last copy.

    Args:
        x: A (batch, channels, H, W) map.
    """
    if _applies(x, torch.contiguous_format, x.is_contiguous(memory_format=torch.channels_last)):
        b, c, h, w = x.shape
        out = _swap(x, b, c, 1, h * w)
        if out is not None:
            return out.view(b, h, w, c).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def to_transposed_nchw(x: torch.Tensor) -> torch.Tensor:
    """`x.transpose(-1, -2).contiguous()`: a channels_last map's columns as the rows of an NCHW (batch, channels,
    W, H) map.

    Args:
        x: A (batch, channels, H, W) map.
    """
    t = x.transpose(-1, -2)
    if _applies(x, torch.channels_last, t.is_contiguous()):
        b, c, h, w = x.shape
        out = _swap(x, b, h, w, c)
        if out is not None:
            return out.view(b, c, w, h)
    return t.contiguous()


def from_transposed_nchw(x: torch.Tensor) -> torch.Tensor:
    """`x.transpose(-1, -2).contiguous(memory_format=torch.channels_last)`: the inverse of `to_transposed_nchw`,
    an NCHW (batch, channels, W, H) map as the channels_last (batch, channels, H, W) map whose columns it holds.

    Args:
        x: A (batch, channels, W, H) map.
    """
    t = x.transpose(-1, -2)
    if _applies(x, torch.contiguous_format, t.is_contiguous(memory_format=torch.channels_last)):
        b, c, w, h = x.shape
        out = _swap(x, b, c, w, h)
        if out is not None:
            return out.view(b, h, w, c).permute(0, 3, 1, 2)
    return t.contiguous(memory_format=torch.channels_last)


def cross_copies(x: torch.Tensor) -> torch.Tensor:
    """`torch.stack((x.contiguous(), x.transpose(-1, -2).contiguous()), 1)` flattened to pixels: a channels_last
    map's row-major and column-major flattenings in one (batch, 2, channels, H * W) tensor (VMamba's cross-scan,
    each copy read by two of its routes), written by the layout kernel straight into their halves where it takes
    the map.

    Args:
        x: A (batch, channels, H, W) map.
    """
    b, c, h, w = x.shape
    out = torch.empty((b, 2, c, h * w), dtype=x.dtype, device=x.device)
    tiled = _applies(x, torch.channels_last, False)
    if not tiled or _swap(x, b, h * w, 1, c, out=out[:, 0]) is None:
        out[:, 0].view(b, c, h, w).copy_(x)
    if not tiled or _swap(x, b, h, w, c, out=out[:, 1]) is None:
        out[:, 1].view(b, c, w, h).copy_(x.transpose(-1, -2))
    return out


def group_sum_channels_last(x: torch.Tensor, groups: int) -> torch.Tensor:
    """`x.unflatten(1, (groups, -1)).sum(dim=1, dtype=x.dtype).contiguous(memory_format=torch.channels_last)`: the
    maps of a channel's G groups summed (in group order; 16-bit maps in float32, rounded once) and laid out
    channels_last, a 2D mixer's four routes as the layout its next layers read. A float32 map is summed and written
    channels_last in one pass (2 or 4 groups); a 16-bit one is summed by PyTorch and copied by `to_channels_last`
    (a 16-bit twin of the one-pass kernel moved a third of the bandwidth on an H100). Not differentiable (the
    scan's autograd calls it).

    Args:
        x: An NCHW (batch, groups * channels, H, W) map, group-major channels.
        groups: G.
    """
    if groups == 1:
        return to_channels_last(x)
    b, c, h, w = x.shape
    channels = c // groups
    if x.dtype == torch.float32 and groups in cuda_build.GROUP_SUM_GROUPS and _applies(x, torch.contiguous_format,
                                                                                      False):
        blocks = _grid(x, b, channels, 1, h * w)
        if blocks is not None:
            out = torch.empty((b, channels, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
            index = device_index(x.device)
            name = cuda_build.group_sum_kernel_name(groups)
            fn = compiled_kernels(_kernels, (index, name), index, cuda_build.LAYOUT_SOURCE, lambda: [name])[0]
            params = make_params(GroupSumParams, src=x, dst=out, batch=b, channels=channels, pixels=h * w)
            launch_kernel(fn, x.device, (blocks, 1), cuda_build.LAYOUT_THREADS, 0, params)
            return out
    return to_channels_last(x.unflatten(1, (groups, channels)).sum(dim=1, dtype=x.dtype))


def silu_usable(x: torch.Tensor) -> bool:
    """Whether `silu_both_layouts(x)` may run: `x` is a CUDA channels_last map (not also NCHW-contiguous) that the
    layout copies take.

    Args:
        x: A (batch, channels, H, W) map.
    """
    if not _applies(x, torch.channels_last, x.is_contiguous()):
        return False
    b, c, h, w = x.shape
    return _grid(x, b, h * w, 1, c) is not None


def silu_both_layouts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(F.silu(x), F.silu(x).contiguous())` of a channels_last map in one pass: the activation in x's layout and
    its NCHW copy; differentiable, the backward adding both outputs' gradients (in x's dtype, as autograd would)
    before SiLU's derivative, in the same pass. The caller checks `silu_usable(x)` first.

    Args:
        x: A (batch, channels, H, W) channels_last map on a CUDA device.
    """
    return _SiluBothLayouts.apply(x)


class _SiluBothLayouts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        b, c, h, w = x.shape
        y = torch.empty_like(x)  # channels_last, like x
        u = torch.empty((b, c, h, w), dtype=x.dtype, device=x.device)
        _launch_silu(x, False, x=x, y=y, u=u)
        ctx.save_for_backward(x)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no map of zeros to read
        return y, u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, du):
        (x,) = ctx.saved_tensors
        if dy is None and du is None:
            return None
        dy = None if dy is None else dy.contiguous(memory_format=torch.channels_last)
        du = None if du is None else du.contiguous()
        dx = torch.empty_like(x)
        _launch_silu(x, True, x=x, dy=dy, du=du, dx=dx)
        return dx


def _launch_silu(x: torch.Tensor, backward: bool, /, **tensors) -> None:
    b, c, h, w = x.shape
    index = device_index(x.device)
    name = cuda_build.silu_kernel_names(cuda_build.DTYPE_TAGS[x.dtype])[int(backward)]
    fn = compiled_kernels(_kernels, (index, name), index, cuda_build.LAYOUT_SOURCE, lambda: [name])[0]
    params = make_params(SiluParams, **tensors, batch=b, pixels=h * w, channels=c)
    launch_kernel(fn, x.device, (_grid(x, b, h * w, 1, c), 1), cuda_build.LAYOUT_THREADS, 0, params)


def _applies(x: torch.Tensor, layout: torch.memory_format, already: bool) -> bool:
    """Whether the kernel takes `x`: a CUDA 4-D map stored in `layout`, not `already` in the target layout (where
    PyTorch returns x itself), of a dtype the kernel moves, outside torch.compile."""
    return (x.is_cuda and x.dim() == 4 and x.dtype in cuda_build.DTYPE_TAGS and x.numel() > 0 and not already
            and x.is_contiguous(memory_format=layout) and not torch.compiler.is_compiling() and cupy_importable())


def _swap(x: torch.Tensor, batch: int, rows: int, mid: int, cols: int,
          out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x's storage as contiguous (batch, rows, mid, cols) copied to (batch, cols, mid, rows): a new contiguous
    tensor, or `out`, whose batch items are contiguous and `out.stride(0)` apart; None (nothing written) where the
    tiles do not pay (`_grid`)."""
    blocks = _grid(x, batch, rows, mid, cols)
    if blocks is None:
        return None
    if out is None:
        out = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
        dst_batch = rows * mid * cols
    else:
        dst_batch = out.stride(0)
    index = device_index(x.device)
    name = cuda_build.layout_kernel_name(x.element_size())
    fn = compiled_kernels(_kernels, (index, name), index, cuda_build.LAYOUT_SOURCE, lambda: [name])[0]
    params = make_params(SwapParams, src=x, dst=out, batch=batch, rows=rows, mid=mid, cols=cols, dst_batch=dst_batch)
    launch_kernel(fn, x.device, (blocks, 1), cuda_build.LAYOUT_THREADS, 0, params)
    return out


def _grid(x: torch.Tensor, batch: int, rows: int, mid: int, cols: int) -> int | None:
    """Blocks (one tile each) of a pass over x's storage as (batch, rows, mid, cols), or None where the tiles do not
    pay: rows or cols under a quarter of a tile's side (the transposed copies of a VSSM's last stages, 7 or 14 pixels
    a side), where most of each tile is empty and PyTorch's copy is as fast (tools/bench_layout.py), or more tiles
    than a grid has blocks."""
    tile = cuda_build.layout_tile(x.element_size())
    blocks = batch * mid * -(-rows // tile) * -(-cols // tile)
    return None if min(rows, cols) < tile // 4 or blocks > _MAX_BLOCKS else blocks
