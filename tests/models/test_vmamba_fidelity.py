"""The backbones compute what upstream VMamba and 2DVMamba compute, checked against the published equations.

The expectations here are written from the papers, step by step in float64, with the loop oracle of
`scan_oracle.py` for the selective scan, and share nothing with the module but its parameters: a layer norm with
upstream's eps (1e-5, `nn.LayerNorm`'s default, which VMamba and 2DVMamba use for every norm), the projections,
the depthwise convolution, the four scan routes, their sum, out_norm and out_proj. Inputs are scaled so that the
norms see variances near eps, where eps decides the result (at unit variance a wrong eps hides).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from scan_oracle import loop_scan

import mamba2d  # noqa: F401  (registers the backbones)
from mamba2d.models.vmamba import SS2D, VSSBlock

UPSTREAM_EPS = 1e-5
ROUTES_2D = ("tl_hv", "tl_vh", "br_hv", "br_vh")


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the channels of an NCHW map (biased variance)."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double()[:, None, None] + bias.double()[:, None, None]


def _pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 projection with an (out, in) weight."""
    return torch.einsum("bihw,oi->bohw", x, weight.double())


def _route_sequences(t: torch.Tensor, route: int) -> torch.Tensor:
    """VMamba's cross-scan of a (b, c, H, W) map: route 0 row-major, 1 column-major, 2 and 3 those reversed;
    returned as (b, c, 1, H*W) sequences."""
    seq = t.flatten(2) if route % 2 == 0 else t.transpose(2, 3).flatten(2)
    return (seq.flip(-1) if route >= 2 else seq)[:, :, None]


def _route_merge(y: torch.Tensor, route: int, height: int, width: int) -> torch.Tensor:
    seq = y[:, :, 0].flip(-1) if route >= 2 else y[:, :, 0]
    return seq.unflatten(-1, (height, width)) if route % 2 == 0 else seq.unflatten(-1, (width, height)).transpose(2, 3)


def ss2d_expected(op: SS2D, x: torch.Tensor, eps: float, scan: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SS2D from the equations: (output, the out_norm's input). A, D and the dt bias enter in float32, as
    upstream's selective scan takes them (`A_logs.float()`, `Ds.float()`, `dt_projs_bias.float()`)."""
    b, _, h, w = x.shape
    r, n, d = op.dt_rank, op.d_state, op.d_inner
    u = _pointwise(x, op.in_proj.weight)
    u = F.conv2d(u, op.conv2d.weight.double(), None if op.conv2d.bias is None else op.conv2d.bias.double(),
                 padding=op.conv2d.padding, groups=d)
    u = u * torch.sigmoid(u)  # SiLU
    summed = torch.zeros(b, d, h, w, dtype=torch.float64)
    for k in range(4):
        dbl = torch.einsum("bdhw,cd->bchw", u, op.x_proj_weight[k].double())
        dts, B, C = torch.split(dbl, [r, n, n], dim=1)
        delta = torch.einsum("brhw,dr->bdhw", dts, op.dt_projs_weight[k].double())
        channels = slice(k * d, (k + 1) * d)
        A = -torch.exp(op.A_logs[channels].float()).double()
        D, bias = op.Ds[channels].float().double(), op.dt_projs_bias[k].float().double()
        if scan == "2d":
            y = loop_scan(u, delta, A, B[:, None], C[:, None], D=D, delta_bias=bias, direction=ROUTES_2D[k])
        else:
            seqs = [_route_sequences(t, k) for t in (u, delta, B, C)]
            y = _route_merge(loop_scan(seqs[0], seqs[1], A, seqs[2][:, None], seqs[3][:, None], D=D,
                                       delta_bias=bias, direction="tl_hv"), k, h, w)
        summed = summed + y
    normed = _layer_norm(summed, op.out_norm.weight, op.out_norm.bias, eps)
    return _pointwise(normed, op.out_proj.weight), summed


def _randomise_affine(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial norm weights and biases, so that the test also sees which ones are applied where."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scan", ["2d", "cross1d"])
def test_ss2d_matches_the_equations_with_upstream_eps(scan):
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(5)
    op = SS2D(d_model=6, d_state=2, ssm_ratio=2.0, scan=scan, scan_backend="reference").double().eval()
    _randomise_affine(op, gen)
    x = 0.005 * torch.randn(2, 6, 5, 4, generator=gen, dtype=torch.float64)

    expected, norm_input = ss2d_expected(op, x, UPSTREAM_EPS, scan)
    var = norm_input.var(1, unbiased=False)
    assert var.median() < 1e-4, "the out_norm input must be small enough for eps to matter"
    with torch.no_grad():
        got = op(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # SS2D works on (B, H, W, C) rows
    assert op.out_norm.eps == UPSTREAM_EPS
    assert _rel(got, expected) < 1e-9
    # The test has teeth: timm LayerNorm2d's eps (1e-6) gives another model at this scale.
    other, _ = ss2d_expected(op, x, 1e-6, scan)
    assert _rel(other, expected) > 1e-2


@pytest.mark.parametrize("scan", ["2d", "cross1d"])
def test_block_matches_the_equations_with_upstream_eps(scan):
    """x + SS2D(LN(x)), then x + MLP(LN(x)) with a GELU MLP, every norm with eps 1e-5."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(2)
    block = VSSBlock(8, d_state=1, ssm_ratio=1.0, scan=scan, scan_backend="reference").double().eval()
    _randomise_affine(block, gen)
    with torch.no_grad():  # small in_proj weights: the scan's output variance sits near eps, as in trained models
        block.op.in_proj.weight.mul_(0.01)
    x = torch.randn(2, 8, 4, 6, generator=gen, dtype=torch.float64)

    n1 = _layer_norm(x, block.norm.weight, block.norm.bias, UPSTREAM_EPS)
    mixed, norm_input = ss2d_expected(block.op, n1, UPSTREAM_EPS, scan)
    assert norm_input.var(1, unbiased=False).median() < 1e-4
    x1 = x + mixed
    n2 = _layer_norm(x1, block.norm2.weight, block.norm2.bias, UPSTREAM_EPS)
    hidden = F.gelu(_pointwise(n2, block.mlp.fc1.weight) + block.mlp.fc1.bias.double()[:, None, None])
    expected = x1 + _pointwise(hidden, block.mlp.fc2.weight) + block.mlp.fc2.bias.double()[:, None, None]
    with torch.no_grad():
        got = block(x)
    assert _rel(got - x, expected - x) < 1e-9


@pytest.mark.parametrize("name", ["vmamba2d_nano", "vmamba_nano"])
def test_stem_and_downsample_match_the_equations(name):
    """patch_embed: conv3x3/2 -> LN -> GELU -> conv3x3/2 -> LN; downsample: conv3x3/2 -> LN; all eps 1e-5."""
    gen = torch.Generator().manual_seed(7)
    model = timm.create_model(name, num_classes=0).double().eval()
    _randomise_affine(model, gen)
    pe = model.patch_embed
    with torch.no_grad():  # small convolutions put the norms' inputs near eps
        for conv in (pe[0], pe[5], model.layers[0].downsample[1]):
            conv.weight.mul_(1e-3)
            conv.bias.mul_(1e-3)
    x = torch.randn(1, 3, 20, 28, generator=gen, dtype=torch.float64)

    def conv(m, t):
        return F.conv2d(t, m.weight.double(), m.bias.double(), stride=2, padding=1)

    a = conv(pe[0], x)
    assert a.var(1, unbiased=False).median() < 1e-4
    stem = _layer_norm(conv(pe[5], F.gelu(_layer_norm(a, pe[2].weight, pe[2].bias, UPSTREAM_EPS))),
                       pe[7].weight, pe[7].bias, UPSTREAM_EPS)
    feature = 1e-3 * torch.randn(1, 32, 5, 7, generator=gen, dtype=torch.float64)
    down = model.layers[0].downsample
    expected_down = _layer_norm(conv(down[1], feature), down[3].weight, down[3].bias, UPSTREAM_EPS)
    with torch.no_grad():
        assert _rel(model.patch_embed(x), stem) < 1e-9
        assert _rel(down(feature), expected_down) < 1e-9
        other = _layer_norm(conv(down[1], feature), down[3].weight, down[3].bias, 1e-6)
    assert _rel(other, expected_down) > 1e-2


def _norms(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or hasattr(m, "eps")}


@pytest.mark.parametrize("name", timm.list_models("vmamba*"))
@pytest.mark.parametrize("features_only", [False, True])
def test_every_norm_of_every_backbone_uses_upstream_eps(name, features_only):
    with torch.device("meta"):
        model = timm.create_model(name, features_only=features_only)
    backbone = model.model if features_only else model
    norms = _norms(model)
    depth = sum(len(layer.blocks) for layer in backbone.layers)
    # stem 2, downsampling 3, per block norm, norm2 and out_norm, the classifier's norm, the dense outnorm0..3
    assert len(norms) == 2 + 3 + 3 * depth + 1 + (4 if features_only else 0), sorted(norms)
    assert {name: m.eps for name, m in norms.items() if m.eps != UPSTREAM_EPS} == {}


def test_norm_eps_is_a_constructor_argument():
    model = timm.create_model("vmamba2d_nano", norm_eps=1e-6)
    assert {m.eps for m in _norms(model).values()} == {1e-6}
