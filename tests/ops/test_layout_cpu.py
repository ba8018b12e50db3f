"""The layout copies (mamba2d.ops.cuda_layout) off the GPU: PyTorch's expression, in values and strides."""

from __future__ import annotations

import pytest
import torch

from mamba2d.ops import cuda_layout

CL = torch.channels_last


@pytest.mark.parametrize("fn,layout,expression", [
    (cuda_layout.to_nchw, CL, lambda x: x.contiguous()),
    (cuda_layout.to_channels_last, torch.contiguous_format, lambda x: x.contiguous(memory_format=CL)),
    (cuda_layout.to_transposed_nchw, CL, lambda x: x.transpose(-1, -2).contiguous()),
    (cuda_layout.from_transposed_nchw, torch.contiguous_format,
     lambda x: x.transpose(-1, -2).contiguous(memory_format=CL)),
])
def test_cpu_maps_get_pytorch_copies(fn, layout, expression):
    x = torch.randn(2, 5, 7, 3).contiguous(memory_format=layout)
    expected, out = expression(x), fn(x)
    assert torch.equal(out, expected) and out.stride() == expected.stride()
    assert not cuda_layout._applies(x, layout, False)


def test_cpu_maps_do_not_take_the_silu_kernel():
    assert not cuda_layout.silu_usable(torch.randn(2, 5, 7, 3).contiguous(memory_format=CL))


def test_cpu_group_sum_channels_last_is_pytorch_sum():
    x = torch.randn(2, 4 * 5, 7, 3)
    out = cuda_layout.group_sum_channels_last(x, 4)
    expected = x.unflatten(1, (4, 5)).sum(dim=1).contiguous(memory_format=CL)
    assert torch.equal(out, expected) and out.stride() == expected.stride()


def _cross_copies_expression(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return torch.stack((x.contiguous().view(b, c, h * w), x.transpose(-1, -2).contiguous().view(b, c, h * w)), 1)


def test_cpu_cross_copies_are_pytorch_copies():
    x = torch.randn(2, 5, 7, 3).contiguous(memory_format=CL)
    out = cuda_layout.cross_copies(x)
    assert out.shape == (2, 2, 5, 21) and out.is_contiguous() and torch.equal(out, _cross_copies_expression(x))
