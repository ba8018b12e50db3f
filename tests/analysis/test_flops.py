"""FLOPs: the scan formula, the scan as one registered op seen by torch.utils.flop_counter, VMamba's figure."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import mamba2d  # noqa: F401
from mamba2d.analysis import flops as flops_tool
from mamba2d.ops import selective_scan_2d
from mamba2d.ops.flops import scan_flops_from_shapes, selective_scan_flops


def test_scan_formula_1d_and_2d():
    # 1D (H = 1): 9*B*L*D*N + B*D*L for the D skip; 2D adds 6*B*L*D*N; z adds B*D*L.
    b, d, n, length = 2, 8, 4, 30
    assert selective_scan_flops(b, d, 1, length, n) == 9 * b * length * d * n + b * d * length
    assert selective_scan_flops(b, d, 5, 6, n) == 15 * b * length * d * n + b * d * length
    assert selective_scan_flops(b, d, 5, 6, n, with_D=False, with_z=True) == 15 * b * length * d * n + b * d * length
    assert selective_scan_flops(b, d, 5, 6, n, with_D=False) == 15 * b * length * d * n


def _scan_inputs(b=1, d=4, n=2, h=3, w=5, device="cpu"):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, d, h, w, generator=g)
    delta = torch.randn(b, d, h, w, generator=g)
    A = -torch.rand(d, n, generator=g) - 0.5
    B = torch.randn(b, 2, n, h, w, generator=g)
    C = torch.randn(b, 2, n, h, w, generator=g)
    return tuple(t.to(device) for t in (u, delta, A, B, C, torch.ones(d)))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_flop_counter_sees_the_shape_only_scan_as_one_op(device):
    u, delta, A, B, C, D = _scan_inputs(device=device)
    with FlopCounterMode(display=False) as counter:
        y = selective_scan_2d(u, delta, A, B, C, D=D, direction=("tl_hv", "br_vh"), backend="shape_only")
    assert y.shape == u.shape and y.device.type == device
    counts = counter.get_flop_counts()["Global"]
    assert list(counts) == [torch.ops.mamba2d_flops.selective_scan_2d]
    assert counter.get_total_flops() == 2 * selective_scan_flops(1, 4, 3, 5, 2)  # the counter's 2 per multiply-add


def test_shape_only_scan_checks_its_inputs_like_the_scan():
    u, delta, A, B, C, D = _scan_inputs()
    with pytest.raises(ValueError, match="delta must have shape"):
        selective_scan_2d(u, delta[..., :2], A, B, C, D=D, backend="shape_only")


def test_scan_is_one_node_in_the_count():
    model = timm.create_model("vmamba2d_nano")
    report = flops_tool.count_flops(model, (1, 3, 64, 64))
    # nano: depths (1, 1, 2, 1), dims 32..256, ssm_ratio 1, d_state 1, 4 routes; maps 16, 8, 4, 2 pixels wide. The
    # scan op also runs dt_proj (rank dim / 16 -> dim per route, `delta_proj`): counted with it, and no bmm left.
    expected_scan = sum(
        blocks * (selective_scan_flops(1, 4 * dim, side, side, 1) + 4 * dim * (dim // 16) * side * side)
        for blocks, dim, side in ((1, 32, 16), (1, 64, 8), (2, 128, 4), (1, 256, 2))
    )
    assert report.by_operator["scan"] == expected_scan
    assert "bmm" not in report.by_operator
    assert report.flops == sum(report.by_operator.values())


def test_low_rank_delta_counts_its_product_once():
    """A low-rank delta (delta_proj) costs batch * dim * R * H * W multiply-adds on top of the scan, counted in the
    scan op: the total of expanding delta by a matmul before the call."""
    b, G, per_group, R, n, h, w = 2, 2, 3, 4, 2, 3, 5
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, G * per_group, h, w, generator=g)
    low_rank, proj = torch.randn(b, G, R, h, w, generator=g), torch.randn(G, per_group, R, generator=g)
    A, B, C = -torch.rand(G * per_group, n, generator=g), torch.randn(b, G, n, h, w, generator=g), torch.randn(
        b, G, n, h, w, generator=g)
    with FlopCounterMode(display=False) as counter:
        y = selective_scan_2d(u, low_rank, A, B, C, delta_proj=proj, backend="shape_only")
    assert y.shape == u.shape
    product = b * G * per_group * R * h * w
    assert counter.get_total_flops() == 2 * (selective_scan_flops(b, G * per_group, h, w, n, with_D=False) + product)
    with FlopCounterMode(display=False) as counter:
        full = torch.einsum("gdr,bgrhw->bgdhw", proj, low_rank).flatten(1, 2)
    assert counter.get_total_flops() == 2 * product
    assert scan_flops_from_shapes(low_rank.shape, B.shape, False, False, A_shape=A.shape) == (
        scan_flops_from_shapes(full.shape, B.shape, False, False) + product)
    with pytest.raises(ValueError, match=r"delta \(batch, dim, H, W\) or \(batch, G, R, H, W\) with A"):
        scan_flops_from_shapes(low_rank.shape, B.shape, False, False)


def test_fvcore_agrees_exactly_when_installed():
    pytest.importorskip("fvcore")
    report = flops_tool.count_flops(timm.create_model("vmamba2d_nano"), (1, 3, 64, 64), fvcore=True)
    assert report.fvcore_flops == report.flops


def test_counting_leaves_the_model_unchanged():
    model = timm.create_model("vmamba_nano").eval()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    backends = [m.scan_backend for m in model.modules() if hasattr(m, "scan_backend")]
    assert backends and "shape_only" not in backends
    flops_tool.count_flops(model, (1, 3, 32, 32))
    assert [m.scan_backend for m in model.modules() if hasattr(m, "scan_backend")] == backends
    torch.testing.assert_close(model(x), before)


def test_vmamba_tiny_matches_vmamba_published_figures(capsys):
    # VMamba-T [s1l8]: 30.25 M params (with head), 4.906 G FLOPs at 224 (VMamba's README / get_flops).
    (report,) = flops_tool.flops(["vmamba_tiny"], size=224)
    out = capsys.readouterr().out
    assert "params           30.25 M" in out
    assert "FLOPs            4.906 G" in out
    assert round(report.flops / 1e9, 3) == 4.906


@pytest.mark.parametrize("arch", ["vmamba2d_nano"])
def test_2d_scan_costs_more_than_cross_1d(arch):
    r2d = flops_tool.count_flops(timm.create_model(arch), (1, 3, 64, 64))
    r1d = flops_tool.count_flops(timm.create_model(arch.replace("vmamba2d", "vmamba")), (1, 3, 64, 64))
    # Same parameters, same non-scan FLOPs; the 2D scan adds 6*B*L*D*N on every map wider than one pixel.
    assert r2d.params == r1d.params
    assert r2d.flops - r2d.by_operator["scan"] == r1d.flops - r1d.by_operator["scan"]
    assert r2d.by_operator["scan"] > r1d.by_operator["scan"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_counts_as_its_cpu_twin():
    """On a GPU the layer norms run on the package's kernels, which the counter does not see: the count runs on a
    CPU copy, so a CUDA model counts what the same model counts on the CPU."""
    model = timm.create_model("vmamba2d_nano")
    on_cpu = flops_tool.count_flops(model, (2, 3, 64, 64))
    on_gpu = flops_tool.count_flops(model.cuda(), (2, 3, 64, 64))
    assert on_gpu.by_operator == on_cpu.by_operator and on_gpu.flops == on_cpu.flops
    assert next(model.parameters()).is_cuda
