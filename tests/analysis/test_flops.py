"""FLOPs: the scan formula, the scan as one counted node, and VMamba's published figure for the tiny model."""

import pytest
import timm
import torch

import mamba2d  # noqa: F401
from mamba2d.analysis import flops as flops_tool
from mamba2d.ops import selective_scan_2d
from mamba2d.ops.flops import counted_scan_call, selective_scan_flops


def test_scan_formula_1d_and_2d():
    # 1D (H = 1): 9*B*L*D*N + B*D*L for the D skip; 2D adds 6*B*L*D*N; z adds B*D*L.
    b, d, n, length = 2, 8, 4, 30
    assert selective_scan_flops(b, d, 1, length, n) == 9 * b * length * d * n + b * d * length
    assert selective_scan_flops(b, d, 5, 6, n) == 15 * b * length * d * n + b * d * length
    assert selective_scan_flops(b, d, 5, 6, n, with_D=False, with_z=True) == 15 * b * length * d * n + b * d * length
    assert selective_scan_flops(b, d, 5, 6, n, with_D=False) == 15 * b * length * d * n


def _scan_inputs(b=1, d=4, n=2, h=3, w=5):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, d, h, w, generator=g)
    delta = torch.randn(b, d, h, w, generator=g)
    A = -torch.rand(d, n, generator=g) - 0.5
    B = torch.randn(b, 2, n, h, w, generator=g)
    C = torch.randn(b, 2, n, h, w, generator=g)
    return u, delta, A, B, C, torch.ones(d)


def test_counted_op_computes_the_scan():
    u, delta, A, B, C, D = _scan_inputs()
    expected = selective_scan_2d(u, delta, A, B, C, D=D, direction=("tl_hv", "br_vh"))
    got = counted_scan_call(u, delta, A, B, C, D=D, direction=("tl_hv", "br_vh"))
    torch.testing.assert_close(got, expected)


def test_scan_is_one_node_for_both_counters():
    model = timm.create_model("vmamba2d_nano")
    report = flops_tool.count_flops(model, (1, 3, 64, 64))
    # nano: depths (1, 1, 2, 1), dims 32..256, ssm_ratio 1, d_state 1, 4 routes; maps 16, 8, 4, 2 pixels wide.
    expected_scan = sum(
        blocks * selective_scan_flops(1, 4 * dim, side, side, 1)
        for blocks, dim, side in ((1, 32, 16), (1, 64, 8), (2, 128, 4), (1, 256, 2))
    )
    assert report.by_operator["scan"] == expected_scan
    # torch.utils.flop_counter (with the registered formula) agrees exactly on what both count.
    assert report.flop_counter_flops == report.shared_flops
    # The scan's element-wise pieces never leak into fvcore's count as separate ops.
    assert not any("scan" in op for op in report.uncounted_ops)


def test_counting_leaves_the_model_unchanged():
    model = timm.create_model("vmamba_nano").eval()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    flops_tool.count_flops(model, (1, 3, 32, 32))
    from mamba2d.models import vmamba

    assert vmamba.selective_scan_2d is selective_scan_2d  # the counting swap is undone
    torch.testing.assert_close(model(x), before)


def test_vmamba_tiny_matches_vmamba_published_figures(capsys):
    # VMamba-T [s1l8]: 30.25 M params (with head), 4.906 G FLOPs at 224 (VMamba's README / get_flops).
    assert flops_tool.main(["vmamba_tiny", "--size", "224"]) == 0
    out = capsys.readouterr().out
    assert "params           30.25 M" in out
    assert "FLOPs (fvcore)   4.906 G" in out


@pytest.mark.parametrize("arch", ["vmamba2d_nano"])
def test_2d_scan_costs_more_than_cross_1d(arch):
    r2d = flops_tool.count_flops(timm.create_model(arch), (1, 3, 64, 64))
    r1d = flops_tool.count_flops(timm.create_model(arch.replace("vmamba2d", "vmamba")), (1, 3, 64, 64))
    # Same parameters, same non-scan FLOPs; the 2D scan adds 6*B*L*D*N on every map wider than one pixel.
    assert r2d.params == r1d.params
    assert r2d.flops - r2d.by_operator["scan"] == r1d.flops - r1d.by_operator["scan"]
    assert r2d.by_operator["scan"] > r1d.by_operator["scan"]
