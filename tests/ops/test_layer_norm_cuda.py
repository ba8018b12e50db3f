"""GPU tests of the short-row layer-norm kernel (mamba2d.ops.cuda_layer_norm) against PyTorch's layer norm in
float64 (outputs and gradients), and of the backbone using it in inference and training."""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mamba2d.models import vmamba
from mamba2d.ops import cuda_build, cuda_layer_norm, cuda_scan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_scan.cupy_importable(), reason="needs CuPy (mamba2d[cuda12] or [cuda13])"),
]

BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _use_kernel(model: torch.nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, (vmamba.ChannelsLastLayerNorm2d, vmamba.GemmInputLayerNorm)):
            module.kernel = on


class _NormAudit(TorchDispatchMode):
    """Counts PyTorch's layer norms dispatched while active: aten.native_layer_norm where autograd records, and
    aten.layer_norm itself under inference mode, which reaches the dispatcher undecomposed."""

    def __init__(self):
        super().__init__()
        self.pytorch_norms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.pytorch_norms += func in (torch.ops.aten.native_layer_norm.default, torch.ops.aten.layer_norm.default)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_tf32(monkeypatch):
    """Model comparisons: TF32 GEMMs and convolutions would differ by more than the norms do."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


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


def test_usable_only_for_contiguous_rows_of_matching_parameters():
    x = torch.randn(2, 5, 7, 48, device="cuda")
    assert cuda_layer_norm.usable(x, torch.ones(48, device="cuda", requires_grad=True), None)
    assert not cuda_layer_norm.usable(x.transpose(1, 2), None, None)
    assert not cuda_layer_norm.usable(torch.randn(3, cuda_build.LAYER_NORM_MAX_C + 1, device="cuda"), None, None)
    assert not cuda_layer_norm.usable(x.cpu(), None, None)
    assert not cuda_layer_norm.usable(x, torch.ones(47, device="cuda"), None)  # F.layer_norm raises its own error
    assert not cuda_layer_norm.usable(x, None, torch.ones(48))


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float32)])
@pytest.mark.parametrize("channels,affine,rows", [(48, True, 90), (96, False, 90), (384, True, 90), (1000, True, 90),
                                                  (1, True, 7), (7, True, 90), (127, True, 1), (768, True, 90),
                                                  (1024, True, 90), (96, True, 40_000), (768, False, 3_000)])
def test_gradients_match_pytorch(dtype, out_dtype, channels, affine, rows):
    """Input, weight and bias gradients (the kernels' backward from the forward's mean and 1/std) against
    F.layer_norm's autograd in float64 on the same rounded inputs, for row lengths that fill a lane's values or
    not, row counts that end inside a warp (its lanes past the last row must still join the row sums' shuffles)
    and row counts beyond one pass of the backward's grid."""
    gen = torch.Generator().manual_seed(channels)
    x = (torch.randn(rows, channels, generator=gen) * 2 + 0.5).to(dtype).cuda()
    params = [torch.randn(channels, generator=gen).cuda() if affine else None for _ in range(2)]
    dy = torch.randn(x.shape, generator=gen).cuda().to(out_dtype)

    def grads(fn, reference):
        leaves = [None if t is None else (t.double() if reference else t.clone()).requires_grad_()
                  for t in (x, *params)]
        fn(*leaves).backward(dy.double() if reference else dy)
        return [t.grad for t in leaves if t is not None]

    ours = grads(lambda r, w, b: cuda_layer_norm.layer_norm(r, w, b, 1e-6, out_dtype), False)
    ref = grads(lambda r, w, b: F.layer_norm(r, (channels,), w, b, 1e-6), True)
    assert [g.dtype for g in ours] == [dtype] + [torch.float32] * (2 if affine else 0)
    out = cuda_layer_norm.layer_norm(x.clone().requires_grad_(), *params, 1e-6, out_dtype)
    kept = out.grad_fn.saved_tensors[0]
    assert kept.dtype == min(dtype, out_dtype, key=lambda t: t.itemsize)  # a lower-precision output keeps less
    bound = 1e-5 if dtype == out_dtype == torch.float32 else 2e-2
    for name, g, r in zip(("x", "weight", "bias"), ours, ref):
        assert _rel(g, r) <= bound, name


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_narrow_output_gradients_where_the_mean_dominates(out_dtype):
    """With a 16-bit output (autocast) the backward keeps a 16-bit copy of the input, rounded after centring: its
    error is relative to the deviations from the mean, so rows whose mean is a thousand times their spread (where
    rounding the input itself would lose the deviations) get gradients as accurate as the 16-bit output allows."""
    gen = torch.Generator().manual_seed(5)
    x = (1000 + torch.randn(500, 96, generator=gen)).cuda()
    params = [torch.randn(96, generator=gen).cuda() for _ in range(2)]
    dy = torch.randn(x.shape, generator=gen).cuda().to(out_dtype)
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    cuda_layer_norm.layer_norm(*leaves, 1e-5, out_dtype).backward(dy)
    ref = [t.double().requires_grad_() for t in (x, *params)]
    F.layer_norm(ref[0], (96,), ref[1], ref[2], 1e-5).backward(dy.double())
    for name, g, r in zip(("x", "weight", "bias"), leaves, ref):
        assert _rel(g.grad, r.grad) <= 2e-2, name


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("channels", [3, 48, 96, 384, 1000])
def test_backward_matches_pytorch_backward_and_is_deterministic(dtype, out_dtype, channels):
    """From the same kept input and statistics, the backward kernel gives aten::native_layer_norm_backward's
    gradients (float32: to 1e-5; the weight and bias sums differ only in summation order), bitwise the same on a
    second run, and the input's gradient in the input's dtype."""
    gen = torch.Generator().manual_seed(channels + 1)
    x = (torch.randn(6000, channels, generator=gen) * 3 - 1).to(dtype).cuda().requires_grad_()
    weight, bias = (torch.randn(channels, generator=gen).cuda().requires_grad_() for _ in range(2))
    dy = torch.randn(x.shape, generator=gen).cuda().to(out_dtype)
    out = cuda_layer_norm.layer_norm(x, weight, bias, 1e-5, out_dtype)
    kept, _, _, mean, rstd = out.grad_fn.saved_tensors
    assert (mean is None) == (out_dtype.itemsize < dtype.itemsize)  # a narrower output keeps the deviations
    mean = torch.zeros_like(rstd) if mean is None else mean
    first = torch.autograd.grad(out, (x, weight, bias), dy, retain_graph=True)
    second = torch.autograd.grad(out, (x, weight, bias), dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert [g.dtype for g in first] == [dtype, torch.float32, torch.float32]
    want = torch.ops.aten.native_layer_norm_backward(
        dy.to(kept.dtype).float(), kept.float(), [channels], mean, rstd, weight.detach(), bias.detach(),
        [True, True, True])
    for name, g, w in zip(("x", "weight", "bias"), first, want):
        assert _rel(g, w) <= (1e-5 if dtype == out_dtype == torch.float32 else 1e-2), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backbone_inference_matches_pytorch_norms(no_tf32, precision):
    """vmamba2d_nano's eval forward with the kernel norms equals the one with PyTorch's (same output dtype)."""
    model = timm.create_model("vmamba2d_nano", num_classes=10).cuda().eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    low = torch.bfloat16 if precision == "bf16" else None

    def forward():
        with torch.inference_mode(), torch.autocast("cuda", dtype=low) if low else contextlib.nullcontext():
            return model(x)

    dtypes = []
    for module in model.modules():
        if isinstance(module, (vmamba.ChannelsLastLayerNorm2d, vmamba.GemmInputLayerNorm)):
            module.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with _NormAudit() as fast_audit:
        fast = forward()
    assert low is None or {torch.float32, low} <= set(dtypes)
    _use_kernel(model, False)
    with _NormAudit() as plain_audit:
        plain = forward()
    assert plain_audit.pytorch_norms - fast_audit.pytorch_norms >= 10  # the kernel took the backbone's norms
    assert fast.dtype == plain.dtype
    assert _rel(fast, plain) <= (1e-4 if low is None else 3e-2)


def test_backbone_training_gradients_match_pytorch_norms(no_tf32):
    """One fp32 training step of vmamba2d_nano: loss and every parameter gradient with the kernel norms against
    PyTorch's norms (TF32 off)."""
    model = timm.create_model("vmamba2d_nano", num_classes=10).cuda().train()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    target = torch.randint(0, 10, (4,), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same drop-path draws in both steps
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    _use_kernel(model, False)
    loss_ref, grads_ref = step()
    assert _rel(loss, loss_ref) <= 1e-5 and grads.keys() == grads_ref.keys()
    bad = {n: _rel(grads[n], grads_ref[n]) for n in grads if not _rel(grads[n], grads_ref[n]) <= 1e-4}
    assert not bad, bad


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("module", ["ChannelsLastLayerNorm2d", "GemmInputLayerNorm"])
def test_backbone_norms_use_upstream_eps_in_every_path(memory_format, module):
    """On the kernel (channels_last) and on PyTorch's norm (NCHW) the backbone's norms normalise with their own eps,
    upstream's 1e-5 by default, checked where eps decides the result: inputs with a variance near eps. The blocks'
    norms (GemmInputLayerNorm) take the map's (B, H, W, C) rows."""
    norm = getattr(vmamba, module)(96).cuda()
    assert norm.eps == 1e-5
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(96, generator=gen))
        norm.bias.copy_(0.1 * torch.randn(96, generator=gen))
    x = (3e-3 * torch.randn(2, 96, 9, 11, generator=gen)).cuda().contiguous(memory_format=memory_format)
    assert cuda_layer_norm.usable(x.permute(0, 2, 3, 1), norm.weight, norm.bias) == (
        memory_format == torch.channels_last)

    def expected(eps):
        rows = x.double().permute(0, 2, 3, 1)
        mean = rows.mean(-1, keepdim=True)
        var = (rows - mean).pow(2).mean(-1, keepdim=True)
        return ((rows - mean) / torch.sqrt(var + eps) * norm.weight.double() + norm.bias.double()).permute(0, 3, 1, 2)

    with torch.no_grad():
        out = norm(x) if module == "ChannelsLastLayerNorm2d" else norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert _rel(out, expected(1e-5)) <= BOUND[torch.float32]
    assert _rel(expected(1e-6), expected(1e-5)) > 1e-2  # eps matters at this scale


@pytest.mark.parametrize("dtype,branch_dtype,out_dtype", [
    (torch.float32, torch.float32, torch.float32), (torch.float32, torch.float16, torch.float16),
    (torch.float32, torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("channels,samples,pixels", [(96, 3, 30), (7, 2, 5), (384, 2, 49), (768, 1, 9)])
@pytest.mark.parametrize("dropped", [False, True])
def test_add_layer_norm_is_the_sum_then_the_norm(dtype, branch_dtype, out_dtype, channels, samples, pixels, dropped):
    """add_layer_norm's residual sum and its norm, and the gradients of the input, the branch, the weight and the
    bias (the sum's own gradient from elsewhere added), against x + scale * branch then F.layer_norm in float64 on
    the same rounded inputs; each output and gradient in its tensor's dtype."""
    gen = torch.Generator().manual_seed(channels + pixels)
    rows = samples * pixels
    x = (torch.randn(rows, channels, generator=gen) * 2 + 0.5).to(dtype).cuda()
    branch = torch.randn(rows, channels, generator=gen).to(branch_dtype).cuda()
    scale = (torch.tensor([0.0, 1.25, 1.25])[:samples] if dropped else None)
    params = [torch.randn(channels, generator=gen).cuda() for _ in range(2)]
    grads = (torch.randn(rows, channels, generator=gen).to(dtype).cuda(),
             torch.randn(rows, channels, generator=gen).to(out_dtype).cuda())

    leaves = [t.clone().requires_grad_() for t in (x, branch, *params)]
    total, out = cuda_layer_norm.add_layer_norm(leaves[0], leaves[1], None if scale is None else scale.cuda(), pixels,
                                                leaves[2], leaves[3], 1e-5, out_dtype)
    assert (total.dtype, out.dtype) == (dtype, out_dtype)
    torch.autograd.backward((total, out), grads)
    assert [t.grad.dtype for t in leaves] == [dtype, branch_dtype, torch.float32, torch.float32]

    ref = [t.double().requires_grad_() for t in (x, branch, *params)]
    factor = 1.0 if scale is None else scale.double().repeat_interleave(pixels)[:, None].cuda()
    total_ref = ref[0] + factor * ref[1]
    out_ref = F.layer_norm(total_ref, (channels,), ref[2], ref[3], 1e-5)
    torch.autograd.backward((total_ref, out_ref), tuple(g.double() for g in grads))
    exact = dtype == branch_dtype == out_dtype == torch.float32
    assert _rel(total, total_ref) <= (1e-7 if exact else 1e-2)
    assert _rel(out, out_ref) <= (1e-5 if exact else 2e-2)
    for name, g, r in zip(("x", "branch", "weight", "bias"), leaves, ref):
        assert _rel(g.grad, r.grad) <= (1e-5 if exact else 2e-2), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("train", [False, True])
def test_block_with_the_fused_residual_norm_matches_the_modules(no_tf32, precision, train):
    """A VSSBlock computes the same output and gradients whether its first residual sum and norm2 run as one kernel
    (the default on CUDA) or as PyTorch's add, drop path and layer norm; in training with the same drop-path draws."""
    torch.manual_seed(0)
    block = vmamba.VSSBlock(96, drop_path=0.3 if train else 0.0).cuda().train(train)
    x = torch.randn(3, 96, 14, 11, device="cuda").contiguous(memory_format=torch.channels_last)
    low = precision == "bf16"
    results = []
    for fused in (True, False):
        block.norm2.kernel = fused
        leaf = x.clone().requires_grad_()
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low):
            out = block(leaf)
        out.float().square().sum().backward()
        results.append((out.float(), leaf.grad, [p.grad.clone() for p in block.parameters()]))
        block.zero_grad(set_to_none=True)
    (out_f, dx_f, dp_f), (out_p, dx_p, dp_p) = results
    bound = 2e-2 if low else 1e-4
    assert _rel(out_f, out_p) <= bound and _rel(dx_f, dx_p) <= bound
    assert all(_rel(a, b) <= bound for a, b in zip(dp_f, dp_p))


@pytest.mark.parametrize("precision,drop_path", [("fp32", 0.3), ("bf16", 0.0)])
def test_stage_chain_with_the_fused_residual_norm_matches_block_calls(no_tf32, precision, drop_path):
    """vmamba2d_nano's stages on CUDA hand each block's MLP residual sum to the next block's norm, one kernel, in
    forward and backward; the same model with its blocks called as modules (a hook on each) computes the same loss
    and parameter gradients, with the same drop-path draws. (In bf16 the kernel does not round the drop-path product
    to bf16 as the modules do: the block-level test bounds that case.)"""
    torch.manual_seed(0)
    model = timm.create_model("vmamba2d_nano", num_classes=10, drop_path_rate=drop_path).cuda().train()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    low = precision == "bf16"
    results = []
    for hooked in (False, True):
        handles = [block.register_forward_hook(lambda module, args, out: None)
                   for layer in model.layers for block in layer.blocks] if hooked else []
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low):
            loss = model(x).float().square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
        for handle in handles:
            handle.remove()
    (loss_c, grads_c), (loss_b, grads_b) = results
    bound = 1e-2 if low else 1e-4
    assert _rel(loss_c, loss_b) <= bound
    assert all(_rel(a, b) <= bound for a, b in zip(grads_c, grads_b))
