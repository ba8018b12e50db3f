"""The pure-PyTorch reference scan against an independent loop oracle, closed forms and symmetries."""

from __future__ import annotations

import itertools

import pytest
import torch
from scan_oracle import loop_scan

from mamba2d.ops import DIRECTIONS, selective_scan_2d, selective_scan_2d_ref

SHAPES = [(1, 6), (5, 1), (5, 7), (13, 4)]


def make_inputs(batch=2, dim=4, height=5, width=7, d_state=3, groups=2, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    tensors = dict(
        u=rand(batch, dim, height, width),
        delta=rand(batch, dim, height, width) * 0.5,
        A=-torch.rand(dim, d_state, generator=g, dtype=torch.float64) * 2 - 0.1,
        B=rand(batch, groups, d_state, height, width),
        C=rand(batch, groups, d_state, height, width),
        D=rand(dim),
        z=rand(batch, dim, height, width),
        delta_bias=rand(dim) * 0.3,
    )
    for name in ("u", "delta", "B", "C", "z"):
        tensors[name] = tensors[name].to(dtype)
    if grad:
        for t in tensors.values():
            t.requires_grad_(True)
    return tensors


def grads(out: torch.Tensor, inputs: dict, seed: int = 1) -> dict:
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    names = list(inputs)
    values = torch.autograd.grad((out * weight).sum(), [inputs[n] for n in names])
    return dict(zip(names, values))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_forward_and_all_gradients_match_loop_oracle(shape, groups, direction):
    inputs = make_inputs(height=shape[0], width=shape[1], groups=groups, seed=hash((shape, groups, direction)) % 1000)
    ours = selective_scan_2d_ref(**inputs, direction=direction)
    oracle = loop_scan(**inputs, direction=direction)
    torch.testing.assert_close(ours, oracle, rtol=1e-10, atol=1e-10)
    got, want = grads(ours, inputs), grads(oracle, inputs)
    for name in inputs:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-9, msg=f"d{name} differs")


def test_one_direction_per_group_and_options_off():
    inputs = make_inputs(dim=8, groups=4, height=4, width=6)
    directions = ("tl_hv", "tl_vh", "br_hv", "br_vh")
    for drop in ("D", "z", "delta_bias"):
        kwargs = {**inputs, drop: None}
        torch.testing.assert_close(
            selective_scan_2d_ref(**kwargs, direction=directions, delta_softplus=False),
            loop_scan(**kwargs, direction=directions, delta_softplus=False),
        )


def test_closed_form_for_constant_abar():
    height, width, dt_value, a_value = 6, 5, 0.7, -0.4
    inputs = make_inputs(batch=1, dim=1, height=height, width=width, d_state=1, groups=1, grad=False)
    u = inputs["u"]
    delta = torch.full_like(u, dt_value)
    A = torch.full((1, 1), a_value, dtype=torch.float64)
    ones = torch.ones(1, 1, 1, height, width, dtype=torch.float64)
    y = selective_scan_2d_ref(u, delta, A, ones, ones, delta_softplus=False)
    abar = torch.exp(torch.tensor(dt_value * a_value, dtype=torch.float64))
    expected = torch.zeros(height, width, dtype=torch.float64)
    for i, j in itertools.product(range(height), range(width)):
        for i2, j2 in itertools.product(range(i + 1), range(j + 1)):
            expected[i, j] += abar ** ((i - i2) + (j - j2)) * dt_value * u[0, 0, i2, j2]
    torch.testing.assert_close(y[0, 0], expected)


def _map_all(inputs: dict, fn) -> dict:
    return {k: fn(v) if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}


def test_bottom_right_is_top_left_on_the_flipped_map():
    inputs = make_inputs(height=6, width=9, grad=False)
    flip = lambda t: t.flip(-1, -2)  # noqa: E731
    for order in ("hv", "vh"):
        y_br = selective_scan_2d_ref(**_map_all(inputs, flip), direction=f"br_{order}")
        y_tl = selective_scan_2d_ref(**inputs, direction=f"tl_{order}")
        torch.testing.assert_close(y_br, flip(y_tl))


def test_columns_first_is_rows_first_on_the_transposed_map():
    inputs = make_inputs(height=6, width=9, grad=False)
    transpose = lambda t: t.transpose(-1, -2)  # noqa: E731
    y_vh = selective_scan_2d_ref(**inputs, direction="tl_vh")
    y_hv = selective_scan_2d_ref(**_map_all(inputs, transpose), direction="tl_hv")
    torch.testing.assert_close(y_vh, transpose(y_hv))


def test_h1_is_the_1d_selective_scan():
    inputs = make_inputs(height=1, width=11, grad=False, groups=1)
    y = selective_scan_2d_ref(**inputs, direction="tl_vh")  # vertical pass is the identity when H = 1
    dt = torch.nn.functional.softplus(inputs["delta"] + inputs["delta_bias"][None, :, None, None])[:, :, 0]
    state = torch.zeros(2, 4, 3, dtype=torch.float64)
    outs = []
    for j in range(11):
        state = torch.exp(dt[..., j, None] * inputs["A"]) * state + (dt[..., j] * inputs["u"][:, :, 0, j])[
            ..., None
        ] * inputs["B"][:, 0, :, 0, j][:, None]
        outs.append((state * inputs["C"][:, 0, :, 0, j][:, None]).sum(-1))
    expected = torch.stack(outs, -1) + inputs["D"][None, :, None] * inputs["u"][:, :, 0]
    expected = expected * torch.nn.functional.silu(inputs["z"][:, :, 0])
    torch.testing.assert_close(y[:, :, 0], expected)


def test_gradcheck_float64():
    inputs = make_inputs(batch=1, dim=2, height=3, width=4, d_state=2, groups=1)
    names = list(inputs)

    def fn(*values):
        return selective_scan_2d_ref(**dict(zip(names, values)), direction="br_vh")

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in names))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    inputs = make_inputs(height=9, width=11, grad=False, dtype=dtype)
    y = selective_scan_2d_ref(**inputs, direction="tl_hv")
    assert y.dtype == dtype
    y32 = selective_scan_2d_ref(**inputs, direction="tl_hv", out_dtype=torch.float32)
    assert y32.dtype == torch.float32
    rounded = {k: v.double() for k, v in inputs.items()}
    exact = loop_scan(**rounded, direction="tl_hv")
    rel = (y32.double() - exact).norm() / exact.norm()
    assert rel < 1e-5
    assert (y.double() - exact).norm() / exact.norm() < 1e-2


def test_long_row_has_no_python_loop_per_pixel():
    inputs = make_inputs(batch=1, dim=2, height=1, width=100_000, d_state=2, groups=1, grad=False, dtype=torch.float32)
    inputs["A"] = inputs["A"].float()
    for name in ("D", "delta_bias"):
        inputs[name] = inputs[name].float()
    y = selective_scan_2d(**inputs)
    assert y.shape == (1, 2, 1, 100_000) and torch.isfinite(y).all()


BAD_INPUTS = [
    ("u must be 4-D", lambda t: {**t, "u": t["u"][0]}),
    ("delta must have shape", lambda t: {**t, "delta": t["delta"][:, :, :-1]}),
    ("A must have shape", lambda t: {**t, "A": t["A"][:, :-1]}),
    ("C must have shape", lambda t: {**t, "C": t["C"][..., :-1]}),
    ("divisible by G",
     lambda t: {**t, "B": t["B"].repeat(1, 3, 1, 1, 1)[:, :3], "C": t["C"].repeat(1, 3, 1, 1, 1)[:, :3]}),
    ("z must have shape", lambda t: {**t, "z": t["z"][:1]}),
    ("D must have shape", lambda t: {**t, "D": t["D"][:-1]}),
    ("delta has dtype", lambda t: {**t, "delta": t["delta"].float()}),
    ("A must be torch.float32 or torch.float64, got torch.float16", lambda t: {**t, "A": t["A"].half()}),
    ("u has unsupported dtype torch.int32; expected one of torch.float32, torch.float16, torch.bfloat16, "
     "torch.float64", lambda t: {**t, "u": t["u"].int()}),
]


@pytest.mark.parametrize("message,mutate", BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_bad_inputs_name_the_argument(message, mutate):
    inputs = make_inputs(grad=False)
    with pytest.raises((ValueError, TypeError), match=message):
        selective_scan_2d(**mutate(inputs))


@pytest.mark.parametrize("backend", ["auto", "cuda", "reference"])
@pytest.mark.parametrize("name", ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"])
@pytest.mark.parametrize("kind", ["numpy", "list"])
def test_non_tensor_arguments_are_named_before_a_backend_is_chosen(backend, name, kind):
    """A numpy array or a list in place of a tensor is named, with what it is, by every backend (the CUDA one
    without CuPy or a GPU too: the check comes first)."""
    inputs = make_inputs(grad=False)
    value = inputs[name].numpy() if kind == "numpy" else inputs[name].tolist()
    got = "numpy.ndarray" if kind == "numpy" else "list"
    with pytest.raises(TypeError, match=rf"^selective_scan_2d: {name} must be a torch.Tensor, got {got}$"):
        selective_scan_2d(**{**inputs, name: value}, backend=backend)


def test_out_dtype_must_be_a_dtype():
    with pytest.raises(TypeError, match="out_dtype must be None or a torch.dtype, got str"):
        selective_scan_2d(**make_inputs(grad=False), out_dtype="float32")


def test_bad_direction_and_backend_are_named():
    inputs = make_inputs(grad=False)
    with pytest.raises(ValueError, match="unknown direction 'tl_xy'"):
        selective_scan_2d(**inputs, direction="tl_xy")
    with pytest.raises(ValueError, match="direction has 3 entries but B/C have G=2"):
        selective_scan_2d(**inputs, direction=("tl_hv",) * 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan_2d(**inputs, backend="triton")


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("shape", [(5, 7), (1, 6), (4, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend", ["reference", "shape_only"])
def test_groups_share_u(shape, backend, blocks):
    """u of blocks * dim / G channels holds `blocks` blocks that the groups share: group g reads block g % blocks
    (one block: every group reads it). The output and every gradient equal the loop oracle's on u tiled along the
    channels to one map per channel, with u's gradient the sum of the tiles'; the shape-only op gives the output's
    and the gradients' shapes."""
    groups, per_group = 4, 3
    inputs = make_inputs(dim=groups * per_group, groups=groups, height=shape[0], width=shape[1], seed=7)
    shared = torch.randn(2, blocks * per_group, *shape, generator=torch.Generator().manual_seed(8),
                         dtype=torch.float64)
    inputs["u"] = shared.requires_grad_()
    directions = ("tl_hv", "tl_vh", "br_hv", "br_vh")
    ours = selective_scan_2d(**inputs, direction=directions, backend=backend)
    assert ours.shape == inputs["delta"].shape
    got = grads(ours, inputs)
    assert all(got[name].shape == inputs[name].shape for name in inputs)
    if backend == "shape_only":
        return
    tiled = {**inputs, "u": shared.detach().repeat(1, groups // blocks, 1, 1).requires_grad_()}
    oracle = loop_scan(**tiled, direction=directions)
    torch.testing.assert_close(ours, oracle, rtol=1e-10, atol=1e-10)
    want = grads(oracle, tiled)
    want["u"] = want["u"].unflatten(1, (groups // blocks, blocks * per_group)).sum(dim=1)
    for name in inputs:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-9, msg=f"d{name} differs")


@pytest.mark.parametrize("blocks", [0, 1, 2], ids=["u", "shared_u", "two_blocks"])
@pytest.mark.parametrize("backend", ["reference", "shape_only"])
def test_sum_groups_is_the_sum_of_the_groups_outputs(backend, blocks):
    """`sum_groups=True` returns channel c of every group added up, (batch, dim / G, H, W), or where the groups
    share u's blocks the groups of each block added up, u's shape; the gradients of that sum (the shape-only op:
    the shape and the gradients' shapes)."""
    groups, per_group = 4, 3
    inputs = make_inputs(dim=groups * per_group, groups=groups, height=5, width=6, seed=9)
    if blocks:
        inputs["u"] = inputs["u"][:, :blocks * per_group].detach().clone().requires_grad_()
    summed_channels = max(blocks, 1) * per_group
    directions = ("tl_hv", "tl_vh", "br_hv", "br_vh")
    summed = selective_scan_2d(**inputs, direction=directions, backend=backend, sum_groups=True)
    assert summed.shape == (2, summed_channels, 5, 6)
    if backend == "shape_only":
        got = grads(summed, inputs)
        assert all(got[name].shape == inputs[name].shape for name in inputs)
        return
    full = selective_scan_2d(**inputs, direction=directions, backend=backend)
    copies = groups * per_group // summed_channels
    want_y = full.unflatten(1, (copies, summed_channels)).sum(dim=1)
    torch.testing.assert_close(summed, want_y, rtol=1e-12, atol=1e-12)
    dy = torch.randn(summed.shape, generator=torch.Generator().manual_seed(4), dtype=summed.dtype)
    got = torch.autograd.grad(summed, list(inputs.values()), dy)
    want = torch.autograd.grad(full, list(inputs.values()), dy.repeat(1, copies, 1, 1))
    for name, g, w in zip(inputs, got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=f"d{name} differs")


def test_u_channels_must_be_dim_or_blocks_of_dim_over_groups():
    """A u that is neither one map per channel nor blocks of one map per channel of a group, as many as divide G,
    is named, with the accepted shapes."""
    inputs = make_inputs(dim=8, groups=4, grad=False)  # blocks of 2 channels: 1, 2 or 4 of them
    for channels in (3, 6):
        with pytest.raises(ValueError, match=rf"u has {channels} channels \(u.shape\[1\]\), neither delta's dim=8 "
                                             r"nor P \* dim / G = P \* 2 for groups sharing u's P blocks"):
            selective_scan_2d(**{**inputs, "u": inputs["u"][:, :channels]})


def make_low_rank(batch=2, groups=4, per_group=3, rank=2, height=5, width=7, shared_u=False, seed=11):
    """Float64 scan inputs whose delta is low-rank: `delta` (batch, G, R, H, W) a strided view (routes outermost, as
    SS2D's x_dbl gives it) and `delta_proj` (G, dim / G, R); u of dim / G channels when `shared_u`."""
    dim = groups * per_group
    inputs = make_inputs(batch=batch, dim=dim, height=height, width=width, d_state=2, groups=groups, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    inputs["delta"] = (torch.randn(groups, rank, batch, height, width, generator=g, dtype=torch.float64)
                       .permute(2, 0, 1, 3, 4).requires_grad_())
    inputs["delta_proj"] = (torch.randn(groups, per_group, rank, generator=g, dtype=torch.float64) * 0.4
                            ).requires_grad_()
    if shared_u:
        inputs["u"] = torch.randn(batch, per_group, height, width, generator=g, dtype=torch.float64).requires_grad_()
    return inputs


def explicit_delta(low_rank: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """The contract's full delta of a low-rank one, written independently of the library."""
    return torch.einsum("gdr,bgrhw->bgdhw", proj, low_rank).flatten(1, 2)


@pytest.mark.parametrize("shape", [(5, 7), (1, 6), (4, 1), (3, 8)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("shared_u", [False, True], ids=["u", "shared_u"])
def test_low_rank_delta_equals_its_explicit_product(shape, groups, shared_u):
    """delta (batch, G, R, H, W) with delta_proj scans as the explicit einsum product would: y and the gradients of
    every input (the low-rank delta and delta_proj through the product) agree in float64."""
    if shared_u and groups == 1:
        pytest.skip("one group: a shared u is an ordinary u")
    inputs = make_low_rank(groups=groups, height=shape[0], width=shape[1], shared_u=shared_u)
    directions = ("tl_hv", "tl_vh", "br_hv", "br_vh")[:groups]
    ours = selective_scan_2d(**inputs, direction=directions, backend="reference")
    assert ours.shape == (2, groups * 3, *shape)
    explicit = {name: t for name, t in inputs.items() if name != "delta_proj"}
    explicit["delta"] = explicit_delta(inputs["delta"], inputs["delta_proj"])
    want_y = selective_scan_2d(**explicit, direction=directions, backend="reference")
    torch.testing.assert_close(ours, want_y, rtol=1e-12, atol=1e-12)
    got, want = grads(ours, inputs), grads(want_y, inputs)
    for name in inputs:
        assert got[name].shape == inputs[name].shape
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=f"d{name} differs")


def test_gradcheck_low_rank_delta():
    inputs = make_low_rank(batch=1, groups=2, per_group=2, rank=2, height=3, width=4)
    names = list(inputs)

    def fn(*values):
        return selective_scan_2d_ref(**dict(zip(names, values)), direction=("tl_hv", "br_vh"))

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in names))


def test_low_rank_delta_is_computed_in_deltas_dtype():
    """A float32 weight is cast to a bfloat16 low-rank delta's dtype: the full delta is the bfloat16 product."""
    inputs = {k: (v.detach().to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v.detach())
              for k, v in make_low_rank().items()}
    inputs["delta_proj"] = inputs["delta_proj"].float()
    explicit = {**inputs, "delta": torch.bmm(
        inputs["delta_proj"].bfloat16().expand(2, -1, -1, -1).flatten(0, 1),
        inputs["delta"].flatten(3).flatten(0, 1)).view(2, 12, 5, 7)}
    del explicit["delta_proj"]
    y = selective_scan_2d(**inputs, direction="tl_hv", out_dtype=torch.float32)
    assert torch.equal(y, selective_scan_2d(**explicit, direction="tl_hv", out_dtype=torch.float32))


BAD_LOW_RANK = [
    (r"delta_proj must be 3-D \(G, dim / G, R\), got shape \(12, 2\)", lambda t: {**t, "delta_proj": t["delta_proj"]
                                                                                 .flatten(0, 1)}),
    (r"delta must be 5-D \(batch, G, R, H, W\) when delta_proj is given, got shape \(2, 8, 5, 7\)",
     lambda t: {**t, "delta": t["delta"].flatten(1, 2)}),
    (r"delta_proj must have shape \(G, dim / G, R\) with G = B.shape\[1\] and dim = u.shape\[1\], or G / P \* "
     r"u.shape\[1\] when the G groups share u's P blocks, = \(4, 3, 2\), got \(2, 6, 2\)",
     lambda t: {**t, "delta_proj": t["delta_proj"].reshape(2, 6, 2)}),
    (r"delta_proj must have shape .* = \(4, 3, 2\), got \(4, 2, 2\)",
     lambda t: {**t, "delta_proj": t["delta_proj"][:, :2]}),
    (r"delta must have shape \(batch, G, R, H, W\) with R = delta_proj.shape\[2\] = \(2, 4, 1, 5, 7\), got "
     r"\(2, 4, 2, 5, 7\)", lambda t: {**t, "delta_proj": t["delta_proj"][..., :1]}),
    (r"delta must have shape \(batch, G, R, H, W\) .* = \(2, 4, 2, 5, 7\), got \(2, 4, 2, 5, 6\)",
     lambda t: {**t, "delta": t["delta"][..., :6]}),
    (r"delta_proj has unsupported dtype torch.int64", lambda t: {**t, "delta_proj": t["delta_proj"].long()}),
    (r"delta has dtype torch.float32 but u has torch.float64", lambda t: {**t, "delta": t["delta"].float()}),
    (r"empty input: .* delta_proj \(4, 3, 0\)", lambda t: {**t, "delta_proj": t["delta_proj"][..., :0],
                                                           "delta": t["delta"][:, :, :0]}),
]


@pytest.mark.parametrize("backend", ["reference", "shape_only"])
@pytest.mark.parametrize("message,mutate", BAD_LOW_RANK, ids=[m[:40] for m, _ in BAD_LOW_RANK])
def test_bad_low_rank_inputs_name_the_argument(message, mutate, backend):
    inputs = {k: v.detach() for k, v in make_low_rank().items()}
    with pytest.raises((ValueError, TypeError), match=message):
        selective_scan_2d(**mutate(inputs), direction="tl_hv", backend=backend)


def test_delta_proj_must_be_a_tensor():
    inputs = {k: v.detach() for k, v in make_low_rank().items()}
    with pytest.raises(TypeError, match=r"^selective_scan_2d: delta_proj must be a torch.Tensor, got list$"):
        selective_scan_2d(**{**inputs, "delta_proj": inputs["delta_proj"].tolist()}, backend="cuda")
