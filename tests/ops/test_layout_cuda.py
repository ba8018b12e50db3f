"""GPU tests of the layout copies (mamba2d.ops.cuda_layout), the route sum written channels_last among them: each
equals its PyTorch expression bit for bit, in values, shape and strides, at odd shapes (H or W = 1, sides and
channel counts off the 32 / 64 tiles) in every dtype the kernel moves, also stored off a 4-byte boundary; the kernel
is what runs on maps it takes (no aten copy dispatched)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mamba2d.models.vmamba import VSSBlock
from mamba2d.ops import cuda_layout, cuda_scan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_scan.cupy_importable(), reason="needs CuPy (mamba2d[cuda12] or [cuda13])"),
]

CL = torch.channels_last
# (function, the layout its input is stored in, the PyTorch expression it stands for)
FUNCTIONS = [
    (cuda_layout.to_nchw, CL, lambda x: x.contiguous()),
    (cuda_layout.to_channels_last, torch.contiguous_format, lambda x: x.contiguous(memory_format=CL)),
    (cuda_layout.to_transposed_nchw, CL, lambda x: x.transpose(-1, -2).contiguous()),
    (cuda_layout.from_transposed_nchw, torch.contiguous_format,
     lambda x: x.transpose(-1, -2).contiguous(memory_format=CL)),
]
SHAPES = [(2, 5, 7, 3), (3, 96, 56, 56), (1, 130, 1, 65), (2, 33, 65, 1), (1, 2, 31, 33), (2, 257, 9, 70),
          (1, 64, 128, 64)]


class _Copies(TorchDispatchMode):
    """The aten operators dispatched while active that copy a tensor."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.copy_, torch.ops.aten.clone, torch.ops.aten._to_copy):
            self.copies.append(str(func))
        return func(*args, **(kwargs or {}))


def _at_offset(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x's values in x's layout, stored `offset` elements into a buffer: with offset 1 a 16-bit map starts off a
    4-byte boundary, so the kernels' paired accesses must fall back to single elements."""
    buffer = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device)
    view = buffer[offset:].as_strided(x.shape, x.stride())
    return view.copy_(x)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index", range(len(FUNCTIONS)))
def test_copy_equals_pytorch_bit_for_bit(index, shape, dtype, offset):
    fn, layout, expression = FUNCTIONS[index]
    gen = torch.Generator().manual_seed(sum(shape) + index)
    x = _at_offset(torch.randn(shape, generator=gen).to(dtype).cuda().contiguous(memory_format=layout), offset)
    expected, out = expression(x), fn(x)
    assert out.shape == expected.shape and out.stride() == expected.stride() and out.dtype == dtype
    assert torch.equal(out, expected) and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_copies_equal_pytorch_bit_for_bit(shape, dtype, offset):
    """`cross_copies`: the row-major and column-major copies of a channels_last map in the halves of one tensor,
    each written by the kernel into its half (batch items 2 * C * H * W apart) where the map's sides fill a quarter
    of a tile, by PyTorch's copy elsewhere: bit for bit the two copies stacked."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = _at_offset(torch.randn(shape, generator=gen).to(dtype).cuda().contiguous(memory_format=CL), offset)
    b, c, h, w = shape
    expected = torch.stack((x.contiguous().view(b, c, h * w), x.transpose(-1, -2).contiguous().view(b, c, h * w)), 1)
    out = cuda_layout.cross_copies(x)
    assert out.shape == expected.shape and out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, expected)
    if min(h, w) >= 16 and c >= 16:
        with _Copies() as audit:
            cuda_layout.cross_copies(x)
        assert audit.copies == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index,shape", [(i, s) for i in range(len(FUNCTIONS)) for s in ((2, 17, 23, 33),
                                                                                        (3, 96, 56, 56))]
                         + [(i, (1, 130, 1, 65)) for i in (0, 1)])
def test_the_kernel_copies(index, shape, dtype):
    """Maps whose sides fill at least a quarter of a tile (and H = 1 for the plain copies) go to the kernel: no aten
    copy is dispatched."""
    fn, layout, expression = FUNCTIONS[index]
    x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=layout)
    with _Copies() as audit:
        out = fn(x)
    assert audit.copies == [] and torch.equal(out, expression(x))


@pytest.mark.parametrize("index", range(len(FUNCTIONS)))
def test_inputs_the_kernel_does_not_take_get_pytorch(index):
    """float64, a strided slice, a map already in the target layout: PyTorch's own result, the same tensor where
    PyTorch returns its input."""
    fn, layout, expression = FUNCTIONS[index]
    for x in (torch.randn(2, 5, 7, 3, device="cuda", dtype=torch.float64).contiguous(memory_format=layout),
              torch.randn(2, 10, 7, 3, device="cuda")[:, ::2].contiguous(memory_format=layout)[:, :, 1:],
              torch.randn(2, 1, 7, 3, device="cuda"), torch.randn(2, 5, 1, 1, device="cuda")):
        expected = expression(x)
        out = fn(x)
        assert torch.equal(out, expected) and out.stride() == expected.stride()
        assert (out.data_ptr() == x.data_ptr()) == (expected.data_ptr() == x.data_ptr())


class _Operators(TorchDispatchMode):
    """The aten operators dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups,shape", [(4, (2, 5, 7, 3)), (4, (3, 96, 56, 56)), (4, (1, 130, 1, 65)),
                                          (2, (2, 33, 65, 1)), (4, (2, 257, 9, 70)), (3, (1, 64, 17, 19)),
                                          (1, (2, 40, 9, 9))])
def test_group_sum_channels_last_equals_pytorch_bit_for_bit(groups, shape, dtype, offset):
    """`group_sum_channels_last`: PyTorch's sum over the groups in their dtype, laid out channels_last, bit for bit
    in values and strides, which is the groups added in order in float32 and rounded once; also with the maps
    stored one element into their buffer, and over memory that held NaN (an element left unwritten shows)."""
    b, c, h, w = shape
    gen = torch.Generator().manual_seed(sum(shape) + groups)
    x = _at_offset(torch.randn(b, groups * c, h, w, generator=gen).to(dtype).cuda(), offset)
    expected = x.unflatten(1, (groups, c)).sum(dim=1, dtype=dtype).contiguous(memory_format=CL)
    in_order = x[:, :c].float()
    for g in range(1, groups):
        in_order = in_order + x[:, g * c:(g + 1) * c].float()
    torch.full_like(expected, float("nan"))  # freed at once: the output is likely to get this memory
    out = cuda_layout.group_sum_channels_last(x, groups)
    assert out.shape == expected.shape and out.stride() == expected.stride() and out.dtype == dtype
    assert torch.equal(out, expected)
    assert torch.equal(out, in_order.to(dtype).contiguous(memory_format=CL))


@pytest.mark.parametrize("groups", [2, 4])
def test_group_sum_channels_last_is_one_kernel(groups):
    """float32 maps whose channels and pixels fill at least a quarter of a tile go to the kernel: no aten operator
    but the output's allocation is dispatched. A 16-bit map is summed by PyTorch and copied by the layout kernel."""
    x = torch.randn(2, groups * 40, 9, 11, device="cuda")
    with _Operators() as audit:
        out = cuda_layout.group_sum_channels_last(x, groups)
    assert set(audit.names) <= {"empty", "empty_strided"}, audit.names
    assert torch.equal(out, x.unflatten(1, (groups, 40)).sum(dim=1).contiguous(memory_format=CL))
    half = x.half()
    with _Operators() as audit:
        cuda_layout.group_sum_channels_last(half, groups)
    assert "sum" in audit.names and not {"clone", "copy_", "_to_copy"} & set(audit.names), audit.names


def _block_and_input(scan: str) -> tuple[VSSBlock, torch.Tensor]:
    """A small VSSBlock on the GPU and a channels_last input whose sides are not multiples of a tile."""
    torch.manual_seed(0)
    block = VSSBlock(48, d_state=4, ssm_ratio=2.0, scan=scan).cuda()
    return block, torch.randn(2, 48, 13, 21, device="cuda").contiguous(memory_format=CL)


def _block_step(block: VSSBlock, x0: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The block's output, the input's gradient and every parameter's gradient of sum(y^2), under autocast to
    `dtype` unless it is float32."""
    block.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y = block(x)
    y.float().square().sum().backward()
    return [y, x.grad, *(p.grad for p in block.parameters())]


@pytest.mark.parametrize("scan", ["2d", "cross1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_is_bitwise_the_same_with_pytorch_copies(scan, dtype, monkeypatch):
    """A VSSBlock's forward and backward on the kernels give exactly what they give with PyTorch's copies (the
    copies move bits, and the scans are deterministic); the SiLU in both layouts has a test of its own."""
    monkeypatch.setattr(cuda_layout, "silu_usable", lambda x: False)
    block, x0 = _block_and_input(scan)
    fast = _block_step(block, x0, dtype)
    monkeypatch.setattr(cuda_layout, "_applies", lambda *args: False)
    plain = _block_step(block, x0, dtype)
    for i, (a, b) in enumerate(zip(fast, plain)):
        assert torch.equal(a, b), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 96, 56, 56), (1, 130, 1, 65), (2, 33, 65, 1), (2, 257, 9, 70)])
@pytest.mark.parametrize("used,offset", [("both", 0), ("channels_last", 0), ("nchw", 0), ("both", 1)])
def test_silu_both_layouts_matches_pytorch(shape, dtype, used, offset):
    """`silu_both_layouts`: F.silu(x) in x's layout and its NCHW copy (the copy bit for bit the activation), and
    x's gradient from either output or both against autograd through F.silu and a copy in the same dtype (the two
    gradients added in that dtype), and against float64; also with x stored one element into its buffer."""
    gen = torch.Generator().manual_seed(sum(shape))
    x0 = _at_offset((torch.randn(shape, generator=gen) * 3).to(dtype).cuda().contiguous(memory_format=CL), offset)
    weights = [torch.randn(shape, generator=gen).to(dtype).cuda() for _ in range(2)]
    if not cuda_layout.silu_usable(x0):
        assert min(shape[1], shape[2] * shape[3]) < 16  # only maps under a quarter tile stay with PyTorch
        return

    def run(fn, x):
        y, u = fn(x)
        terms = {"channels_last": (y * weights[0]).sum(), "nchw": (u * weights[1]).sum()}
        (sum(terms.values()) if used == "both" else terms[used]).backward()
        return y, u

    ours_x, ref_x, x64 = (x0.detach().requires_grad_(), x0.clone().requires_grad_(), x0.double().requires_grad_())
    y, u = run(cuda_layout.silu_both_layouts, ours_x)

    def pytorch(x):
        y = torch.nn.functional.silu(x)
        return y, y.contiguous()

    y_ref, _ = run(pytorch, ref_x)
    run(pytorch, x64)
    assert y.stride() == y_ref.stride() and u.is_contiguous() and torch.equal(u, y.contiguous())
    bound = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y, y_ref, rtol=bound, atol=bound)
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=bound, atol=bound)
    ours_error, pytorch_error = ((g.double() - x64.grad).norm() for g in (ours_x.grad, ref_x.grad))
    assert ours_error <= 4 * pytorch_error + 1e-7 * x64.grad.norm()


@pytest.mark.parametrize("scan", ["2d", "cross1d"])
def test_block_with_silu_both_layouts_matches_pytorch(scan, monkeypatch):
    """A VSSBlock in float32 with the SiLU in both layouts against the same block with PyTorch's SiLU and copy:
    output and every gradient within float32 rounding."""
    block, x0 = _block_and_input(scan)
    fused = _block_step(block, x0, torch.float32)
    monkeypatch.setattr(cuda_layout, "silu_usable", lambda x: False)
    plain = _block_step(block, x0, torch.float32)
    for i, (a, b) in enumerate(zip(fused, plain)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"tensor {i}")
