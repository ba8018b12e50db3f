"""GPU tests of the short-row layer-norm kernel (mamba2d.ops.cuda_layer_norm) against PyTorch's layer norm in
float64, and of the backbone using it for inference."""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch
import torch.nn.functional as F

from mamba2d.ops import cuda_build, cuda_layer_norm, cuda_scan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_scan.cupy_importable(), reason="needs CuPy (mamba2d[cuda12] or [cuda13])"),
]

BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("channels", [1, 3, 8, 48, 50, 96, 127, 192, 384, 768, 1000, 1024])
@pytest.mark.parametrize("rows", [1, 7, 4099])
def test_matches_pytorch_float32(channels, rows):
    gen = torch.Generator().manual_seed(channels * 7919 + rows)
    x = (torch.randn(rows, channels, generator=gen) * 3 + 1.5).cuda()
    weight, bias = torch.randn(channels, generator=gen).cuda(), torch.randn(channels, generator=gen).cuda()
    out = cuda_layer_norm.layer_norm(x, weight, bias, 1e-6, torch.float32)
    ref = F.layer_norm(x.double(), (channels,), weight.double(), bias.double(), 1e-6)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert _rel(out, ref) <= BOUND[torch.float32]
    plain = cuda_layer_norm.layer_norm(x, None, None, 1e-5, torch.float32)
    assert _rel(plain, F.layer_norm(x.double(), (channels,), eps=1e-5)) <= BOUND[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_on_a_channels_last_map(dtype, out_dtype):
    x = torch.randn(3, 96, 11, 13, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(96, device="cuda"), torch.randn(96, device="cuda")
    rows = x.permute(0, 2, 3, 1)
    assert cuda_layer_norm.usable(rows, weight, bias)
    out = cuda_layer_norm.layer_norm(rows, weight, bias, 1e-6, out_dtype)
    ref = F.layer_norm(rows.double(), (96,), weight.double(), bias.double(), 1e-6)
    assert out.dtype == out_dtype and out.is_contiguous()
    assert _rel(out, ref) <= max(BOUND[dtype], BOUND[out_dtype])


def test_usable_only_without_gradients_and_for_contiguous_rows():
    x = torch.randn(2, 5, 7, 48, device="cuda")
    weight = torch.ones(48, device="cuda", requires_grad=True)
    assert cuda_layer_norm.usable(x, None, None)
    assert not cuda_layer_norm.usable(x, weight, None)  # autograd needs PyTorch's kernel
    with torch.no_grad():
        assert cuda_layer_norm.usable(x, weight, None)
    assert not cuda_layer_norm.usable(x.transpose(1, 2), None, None)
    assert not cuda_layer_norm.usable(torch.randn(3, cuda_build.LAYER_NORM_MAX_C + 1, device="cuda"), None, None)
    assert not cuda_layer_norm.usable(x.cpu(), None, None)
    with pytest.raises(ValueError, match="weight has shape"):
        cuda_layer_norm.layer_norm(x, torch.ones(47, device="cuda"), None, 1e-6, torch.float32)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backbone_inference_matches_pytorch_norms(monkeypatch, precision):
    """vmamba2d_nano's eval forward with the kernel norms equals the one with PyTorch's (same output dtype)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = timm.create_model("vmamba2d_nano", num_classes=10).cuda().eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    low = torch.bfloat16 if precision == "bf16" else None

    def forward():
        with torch.inference_mode(), torch.autocast("cuda", dtype=low) if low else contextlib.nullcontext():
            return model(x)

    calls = []
    real = cuda_layer_norm.layer_norm
    monkeypatch.setattr(cuda_layer_norm, "layer_norm", lambda *a: calls.append(a[-1]) or real(*a))
    fast = forward()
    assert len(calls) >= 10 and (low is None or {torch.float32, low} <= set(calls))
    monkeypatch.setattr(cuda_layer_norm, "usable", lambda *a: False)
    plain = forward()
    assert fast.dtype == plain.dtype
    assert _rel(fast, plain) <= (1e-4 if low is None else 3e-2)
