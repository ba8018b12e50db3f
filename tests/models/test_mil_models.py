"""MIL models: outputs, pooling over real patches only, per-slide grids, layers, chunked reference scan."""

import pytest
import torch

from mamba2d.models.mil import MIL_MODELS, MambaMIL1D, MambaMIL2D, create_mil_model
from mamba2d.models.mil_layers import grid_layout, scatter_to_grid

SMALL = {
    "mamba_mil_2d": {"dim": 16},
    "mamba_mil_1d": {"dim": 16},
    "abmil": {"dim": 16, "attn_dim": 8},
    "transmil": {"dim": 16, "heads": 2, "landmarks": 8},
    "mean": {"dim": 16},
    "max": {"dim": 16},
    "grid_cnn": {"dim": 16, "attn_dim": 8},
}


def bag(n=40, in_dim=12, side=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(side * side, generator=g)[:n]
    positions = torch.stack([cells // side, cells % side], dim=1)
    return torch.randn(n, in_dim, generator=g), positions


@pytest.mark.parametrize("name", list(MIL_MODELS))
def test_every_model_gives_logits_and_per_patch_scores(name):
    torch.manual_seed(0)
    model = create_mil_model(name, in_dim=12, num_outputs=4, **SMALL[name])
    features, positions = bag()
    out = model(features, positions)
    assert out.logits.shape == (4,)
    assert out.scores.shape == (40,) and torch.isfinite(out.scores).all()
    out.logits.sum().backward()
    untrained = [n for n, p in model.named_parameters() if p.grad is None]
    assert not untrained


@pytest.mark.parametrize("name", ["mamba_mil_2d", "mamba_mil_1d", "abmil", "transmil", "grid_cnn"])
def test_attention_is_a_distribution_over_real_patches(name):
    model = create_mil_model(name, in_dim=12, num_outputs=2, **SMALL[name]).eval()
    features, positions = bag(n=25, side=11)  # 25 real patches in a 121-cell box: most cells are padding
    scores = model(features, positions).scores
    assert scores.shape == (25,)
    assert torch.all(scores >= 0) and torch.isclose(scores.sum(), torch.tensor(1.0), atol=1e-5)


def test_mamba2d_output_does_not_depend_on_the_empty_margin_or_patch_order():
    torch.manual_seed(0)
    model = MambaMIL2D(in_dim=12, num_outputs=3, dim=16, num_layers=2).eval()
    features, positions = bag()
    ref = model(features, positions)
    shifted = model(features, positions + torch.tensor([7, 30]))  # same slide, other origin: same grid
    perm = torch.randperm(40)
    permuted = model(features[perm], positions[perm])
    torch.testing.assert_close(shifted.logits, ref.logits)
    torch.testing.assert_close(permuted.logits, ref.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permuted.scores, ref.scores[perm], rtol=1e-5, atol=1e-6)


def test_mamba2d_uses_the_2d_arrangement():
    torch.manual_seed(0)
    model = MambaMIL2D(in_dim=12, num_outputs=2, dim=16).eval()
    features, positions = bag()
    transposed = model(features, positions.flip(1)).logits  # same patches, other neighbourhoods
    assert not torch.allclose(transposed, model(features, positions).logits, atol=1e-5)


def test_pad_cells_hold_the_learnable_token():
    features, positions = bag(n=10, side=5)
    flat, height, width = grid_layout(positions)
    pad = torch.arange(3.0)
    grid = scatter_to_grid(torch.ones(10, 3) * 9, flat, height, width, pad)
    cells = grid[0].flatten(1).t()
    real = torch.zeros(height * width, dtype=torch.bool)
    real[flat] = True
    assert torch.all(cells[real] == 9) and torch.all(cells[~real] == pad)
    assert grid.shape[-2:] == (int(positions[:, 0].max() - positions[:, 0].min()) + 1,
                               int(positions[:, 1].max() - positions[:, 1].min()) + 1)


def test_grid_gradients_reach_patches_and_pad_token():
    """float64 gradcheck of the grid's scatter: a patch gets the gradient of its own cell, the pad token the sum over
    the empty cells."""
    features, positions = bag(n=7, side=4)
    flat, height, width = grid_layout(positions)
    h = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    pad = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, pad: scatter_to_grid(h, flat, height, width, pad), (h, pad))
    grad = torch.randn(1, 3, height, width, dtype=torch.float64)
    scatter_to_grid(h, flat, height, width, pad).backward(grad)
    cells = grad[0].flatten(1).t()
    empty = torch.ones(height * width, dtype=torch.bool)
    empty[flat] = False
    assert torch.equal(h.grad, cells[flat]) and torch.allclose(pad.grad, cells[empty].sum(0))


@pytest.mark.parametrize("n", [1, 2, 37])
def test_grid_layout_is_the_bounding_box(n):
    """The flat cell of each patch is row * width + column within the bounding box of the bag's cells (offset
    anywhere, any order), and two patches on one cell are an error."""
    gen = torch.Generator().manual_seed(n)
    cells = torch.randperm(9 * 11, generator=gen)[:n]
    positions = torch.stack([cells // 11 + 40, cells % 11 + 7], dim=1)
    flat, height, width = grid_layout(positions)
    rows, cols = positions[:, 0] - positions[:, 0].min(), positions[:, 1] - positions[:, 1].min()
    assert (height, width) == (int(rows.max()) + 1, int(cols.max()) + 1)
    assert torch.equal(flat, rows * width + cols)
    if n > 1:
        with pytest.raises(ValueError, match="share a grid cell"):
            grid_layout(torch.cat([positions, positions[-1:]]))


@pytest.mark.parametrize("cls", [MambaMIL2D, MambaMIL1D])
def test_any_number_of_layers_all_trained(cls):
    torch.manual_seed(0)
    model = cls(in_dim=12, num_outputs=2, dim=16, num_layers=3)
    features, positions = bag()
    model(features, positions).logits.sum().backward()
    for layer in model.layers:
        assert layer.mixer.in_proj.weight.grad.abs().sum() > 0
        assert layer.mixer.A_log.grad.abs().sum() > 0


def test_each_slide_of_a_case_is_scanned_on_its_own_grid():
    torch.manual_seed(0)
    model = MambaMIL2D(in_dim=12, num_outputs=2, dim=16).eval()
    (fa, pa), (fb, pb) = bag(20, seed=1), bag(15, seed=2)
    features, positions = torch.cat([fa, fb]), torch.cat([pa, pb + 100])
    segments = torch.cat([torch.zeros(20), torch.ones(15)]).long()
    ref = model(features, positions, segments)
    moved = model(features, torch.cat([pa, pb + torch.tensor([3, 500])]), segments)
    torch.testing.assert_close(moved.logits, ref.logits)  # slides never share a canvas
    assert ref.scores.shape == (35,) and torch.isclose(ref.scores.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="share a grid cell"):
        model(features, torch.cat([pa, pa[:15]]))  # one grid: duplicates are an error


def test_mamba1d_follows_raster_order_not_input_order():
    torch.manual_seed(0)
    model = MambaMIL1D(in_dim=12, num_outputs=2, dim=16).eval()
    features, positions = bag()
    perm = torch.randperm(40)
    torch.testing.assert_close(model(features[perm], positions[perm]).logits, model(features, positions).logits,
                               rtol=1e-5, atol=1e-6)


def test_chunked_reference_scan_matches_one_call_forward_and_backward():
    torch.manual_seed(0)
    model = MambaMIL2D(in_dim=12, num_outputs=2, dim=16, num_layers=2, directions=("tl_hv", "br_vh")).eval()
    features, positions = bag()
    features.requires_grad_(True)
    ref = model(features, positions).logits.sum()
    (ref_grad,) = torch.autograd.grad(ref, features)
    for layer in model.layers:
        assert layer.mixer._reference_chunk(torch.zeros(1, 1, 9, 9)) is None  # default budget: one call
        layer.mixer.scan_memory_mb = 1e-3  # forces chunks of one channel
        assert layer.mixer._reference_chunk(torch.zeros(1, 1, 9, 9)) == 1
    out = model(features, positions).logits.sum()
    (grad,) = torch.autograd.grad(out, features)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_bad_bags_are_rejected_with_the_model_name():
    model = MambaMIL2D(in_dim=12, dim=16)
    with pytest.raises(ValueError, match="MambaMIL2D: features must be"):
        model(torch.randn(5, 7), torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(0, 12), torch.zeros(0, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown MIL model"):
        create_mil_model("clam", 12, 2)


def _norm_eps(model: torch.nn.Module) -> dict[str, tuple[str, float]]:
    return {name: (type(m).__name__, m.eps) for name, m in model.named_modules() if hasattr(m, "eps")}


def test_mamba_mil_norms_and_pooling_are_upstreams():
    """2DMambaMIL: RMSNorm (eps 1e-5) before each layer, as mamba.py's ResidualBlock; MambaMIL: nn.LayerNorm
    (eps 1e-5) before each layer; both: a final nn.LayerNorm (eps 1e-5) and tanh attention of width 128, no gate."""
    two_d = create_mil_model("mamba_mil_2d", in_dim=12, num_outputs=2, num_layers=2)
    one_d = create_mil_model("mamba_mil_1d", in_dim=12, num_outputs=2)
    assert _norm_eps(two_d) == {"layers.0.norm": ("RMSNorm2d", 1e-5), "layers.1.norm": ("RMSNorm2d", 1e-5),
                                "norm": ("LayerNorm", 1e-5)}
    assert _norm_eps(one_d) == {"layers.0.norm": ("LayerNorm2d", 1e-5), "layers.1.norm": ("LayerNorm2d", 1e-5),
                                "norm": ("LayerNorm", 1e-5)}
    assert one_d.norm.normalized_shape == (512,) and len(one_d.layers) == 2  # MambaMIL's defaults
    for model in (two_d, one_d):
        assert model.pool.gate is None and model.pool.score.in_features == 128
    transmil = create_mil_model("transmil", in_dim=12, num_outputs=2, **SMALL["transmil"])
    assert {eps for _, eps in _norm_eps(transmil).values()} == {1e-5}
    assert _norm_eps(create_mil_model("abmil", in_dim=12, num_outputs=2)) == {}


def test_mamba_mil_layer_norms_compute_the_equations():
    torch.manual_seed(0)
    x = 1e-3 * torch.randn(1, 16, 3, 5, dtype=torch.float64)
    rms = MambaMIL2D(in_dim=4, dim=16).layers[0].norm.double()
    ln = MambaMIL1D(in_dim=4, dim=16).layers[0].norm.double()
    with torch.no_grad():
        rms.weight.uniform_(0.5, 1.5)
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.1, 0.1)
        w = rms.weight[:, None, None]
        torch.testing.assert_close(rms(x), x / torch.sqrt(x.pow(2).mean(1, keepdim=True) + 1e-5) * w)
        mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
        expected = (x - mean) / torch.sqrt(var + 1e-5) * ln.weight[:, None, None] + ln.bias[:, None, None]
        torch.testing.assert_close(ln(x), expected)


def test_mamba_mil_initialisation_is_upstreams():
    """Every Linear xavier-normal with zero bias (dt_proj's bias included), pad token in [0, 1)."""
    torch.manual_seed(0)
    model = MambaMIL2D(in_dim=64, dim=64)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 8  # embed, in_proj, x_proj, dt_proj, out_proj, two of the pool, head
    for m in linears:
        assert m.bias is None or not m.bias.any()
        expected_std = (2 / (m.in_features + m.out_features)) ** 0.5
        assert 0.7 * expected_std < m.weight.std() < 1.3 * expected_std
    assert 0 <= model.pad_token.min() and model.pad_token.max() < 1 and model.pad_token.std() > 0.1


def test_mamba_mil_variant_options():
    """attention="gated" and init="mamba": ABMIL-style pooling, Mamba's dt initialisation, a small pad token."""
    torch.manual_seed(0)
    model = MambaMIL2D(in_dim=8, dim=32, attention="gated", init="mamba", attn_dim=16)
    assert model.pool.gate is not None and model.pool.score.in_features == 16
    dt = torch.nn.functional.softplus(model.layers[0].mixer.dt_proj.bias)
    assert 1e-3 <= dt.min() and dt.max() <= 0.1
    assert model.pad_token.std() < 0.04 and model.pad_token.abs().max() < 0.1
    with pytest.raises(ValueError, match="attention must be one of .*got 'softmax'"):
        MambaMIL2D(in_dim=8, dim=32, attention="softmax")
    with pytest.raises(ValueError, match="init must be one of .*got 'xavier'"):
        MambaMIL1D(in_dim=8, dim=32, init="xavier")


def _pooled_inputs(model, features, positions):
    seen = []
    handle = model.pool.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model(features, positions)
    handle.remove()
    return seen[0]


def test_grid_cnn_sees_the_5x5_neighbourhood_only_and_ignores_origin_and_order():
    torch.manual_seed(0)
    model = create_mil_model("grid_cnn", in_dim=12, num_outputs=2, dim=16, num_layers=2, attn_dim=8).eval()
    features, positions = bag(n=60, side=9)
    ref = _pooled_inputs(model, features, positions)
    centre = int(torch.argmin((positions - 4).abs().amax(1)))  # the patch nearest the box centre
    distance = (positions - positions[centre]).abs().amax(1)
    for ring, changes in ((3, False), (2, True)):
        others = torch.nonzero(distance == ring).squeeze(1)
        assert len(others), f"no patch at Chebyshev distance {ring}"
        edited = features.clone()
        edited[others] += 5.0
        moved = not torch.allclose(_pooled_inputs(model, edited, positions)[centre], ref[centre], atol=1e-6)
        assert moved == changes, f"a change at distance {ring} {'did not reach' if changes else 'reached'} the centre"
    perm = torch.randperm(60)
    shifted = model(features[perm], positions[perm] + torch.tensor([3, 11]))
    torch.testing.assert_close(shifted.logits, model(features, positions).logits, rtol=1e-5, atol=1e-6)
    transposed = model(features, positions.flip(1)).logits
    assert not torch.allclose(transposed, model(features, positions).logits, atol=1e-5)


def test_grid_cnn_needs_positions():
    model = create_mil_model("grid_cnn", in_dim=12, num_outputs=2, dim=16, attn_dim=8)
    with pytest.raises(ValueError, match="GridCNNMIL: positions are required"):
        model(torch.randn(5, 12))
