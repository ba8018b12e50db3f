"""2DVMamba / VMamba backbones: parameter counts, timm interfaces, shapes, and the cross-scan wiring."""

from __future__ import annotations

import pytest
import timm
import torch

import mamba2d  # noqa: F401
from mamba2d.models.vmamba import SS2D
from mamba2d.ops import selective_scan_2d_ref

PUBLISHED_PARAMS = {"tiny": 30_249_064, "small": 50_147_752, "base": 88_557_800}


@pytest.mark.parametrize("arch", ["vmamba2d", "vmamba"])
@pytest.mark.parametrize("size", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_vmamba_and_build_on_meta(arch, size):
    with torch.device("meta"):
        model = timm.create_model(f"{arch}_{size}", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[size]


def test_both_scan_modes_share_one_checkpoint_layout():
    with torch.device("meta"):
        two_d, one_d = timm.create_model("vmamba2d_tiny"), timm.create_model("vmamba_tiny")
    assert {k: v.shape for k, v in two_d.state_dict().items()} == {k: v.shape for k, v in one_d.state_dict().items()}
    assert "layers.2.blocks.7.op.x_proj_weight" in two_d.state_dict()
    assert "patch_embed.7.weight" in two_d.state_dict() and "classifier.head.weight" in two_d.state_dict()


@pytest.mark.parametrize("name", ["vmamba2d_nano", "vmamba_nano"])
@pytest.mark.parametrize("size", [(224, 320), (45, 61), (32, 32), (17, 9)])
def test_any_input_size(name, size):
    model = timm.create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *size)).shape == (2, 7)


def test_tiny_runs_forward_and_backward_on_non_square_input():
    model = timm.create_model("vmamba2d_tiny", num_classes=5)
    out = model(torch.randn(1, 3, 64, 96))
    out.sum().backward()
    assert out.shape == (1, 5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["vmamba2d_nano", "vmamba_nano"])
def test_features_only_strides_and_norms(name):
    model = timm.create_model(name, features_only=True)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [32, 64, 128, 256]
    feats = model(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(hasattr(model.model, f"outnorm{i}") for i in range(4))
    # the per-stage norms are applied: each pixel's channel vector is standardised, then affine (init 1, 0)
    torch.testing.assert_close(feats[1].mean(1), torch.zeros_like(feats[1][:, 0]), atol=1e-5, rtol=0)

    subset = timm.create_model(name, features_only=True, out_indices=(1, 3))
    assert subset.feature_info.reduction() == [8, 32]
    assert len(subset(torch.randn(1, 3, 64, 64))) == 2


def test_forward_intermediates_and_reset_classifier():
    model = timm.create_model("vmamba2d_nano", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    final, inters = model.forward_intermediates(x)
    assert [t.shape[1] for t in inters] == [32, 64, 128, 256]
    torch.testing.assert_close(model.forward_head(final), model(x))
    only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert [t.shape[1] for t in only] == [32, 128]
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 256, 2, 2)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("vmamba2d_nano", num_classes=4, drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


@pytest.mark.parametrize("shape", [(2, 32, 32), (1, 3, 32, 32, 1), (2, 1, 32, 32)])
def test_wrong_input_rank_or_channels_is_named(shape):
    model = timm.create_model("vmamba2d_nano")
    with pytest.raises(ValueError, match=r"expected an image batch of shape \(batch, 3, H, W\)"):
        model(torch.randn(*shape))


def test_cross1d_routes_are_vmamba_cross_scan():
    """VMamba's four 1D routes: row-major, column-major, and both reversed; outputs merged back and summed."""
    torch.manual_seed(0)
    op = SS2D(d_model=8, d_state=2, scan="cross1d").double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    got = op._scan(x)

    b, d, h, w = x.shape
    k, n, r = 4, op.d_state, op.dt_rank
    expected = torch.zeros_like(x)
    for route in range(k):
        seq = x.flatten(2) if route % 2 == 0 else x.transpose(2, 3).flatten(2)  # (b, d, L)
        if route >= 2:
            seq = seq.flip(-1)
        dbl = torch.einsum("bdl,cd->bcl", seq, op.x_proj_weight[route].double())
        dts, B, C = torch.split(dbl, [r, n, n], dim=1)
        dts = torch.einsum("brl,dr->bdl", dts, op.dt_projs_weight[route].double())
        sl = slice(route * d, (route + 1) * d)
        y = selective_scan_2d_ref(
            seq[:, :, None], dts[:, :, None], -torch.exp(op.A_logs[sl].double()), B[:, None, :, None],
            C[:, None, :, None], D=op.Ds[sl].double(), delta_bias=op.dt_projs_bias[route].double(),
        )[:, :, 0]
        if route >= 2:
            y = y.flip(-1)
        expected += y.reshape(b, d, h, w) if route % 2 == 0 else y.reshape(b, d, w, h).transpose(2, 3)
    torch.testing.assert_close(got, expected)


def test_2d_routes_are_the_four_2d_directions():
    torch.manual_seed(0)
    op = SS2D(d_model=8, d_state=2, scan="2d").double()
    x = torch.randn(1, 8, 4, 6, dtype=torch.float64)
    dbl = torch.einsum("bdhw,kcd->bkchw", x, op.x_proj_weight.double())
    dts, B, C = torch.split(dbl, [op.dt_rank, 2, 2], dim=2)
    dts = torch.einsum("bkrhw,kdr->bkdhw", dts, op.dt_projs_weight.double())
    expected = 0
    for route, direction in enumerate(("tl_hv", "tl_vh", "br_hv", "br_vh")):
        sl = slice(route * 8, (route + 1) * 8)
        expected = expected + selective_scan_2d_ref(
            x, dts[:, route], -torch.exp(op.A_logs[sl].double()), B[:, route : route + 1], C[:, route : route + 1],
            D=op.Ds[sl].double(), delta_bias=op.dt_projs_bias[route].double(), direction=direction,
        )
    torch.testing.assert_close(op._scan(x), expected)
