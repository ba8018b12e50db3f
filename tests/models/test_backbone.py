"""2DVMamba / VMamba backbones: parameter counts, timm interfaces, shapes, the cross-scan wiring, memory layouts."""

from __future__ import annotations

import weakref

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mamba2d  # noqa: F401
from mamba2d.models import vmamba
from mamba2d.models.vmamba import SS2D, VSSBlock
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


def _routes_by_einsum(op: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D's scan part written plainly: einsum projections, one reference scan per route, outputs summed.

    2D: the four directions on the map. Cross 1D: 1D scans (H = 1) of the row-major (routes 0, 2) and column-major
    (routes 1, 3) flattenings, routes 2 and 3 reversed. A, D and the delta bias enter in float32, as in the module.
    """
    b, d, h, w = x.shape
    n, r = op.d_state, op.dt_rank
    dbl = torch.einsum("bdhw,kcd->bkchw", x, op.x_proj_weight)
    dts, B, C = torch.split(dbl, [r, n, n], dim=2)
    dts = torch.einsum("bkrhw,kdr->bkdhw", dts, op.dt_projs_weight)
    y = 0
    for route, direction in enumerate(("tl_hv", "tl_vh", "br_hv", "br_vh")):
        inputs = (x, dts[:, route], B[:, route : route + 1], C[:, route : route + 1])
        if op.scan == "cross1d":
            inputs = [(t if route % 2 == 0 else t.transpose(-1, -2)).flatten(-2)[..., None, :] for t in inputs]
            inputs, direction = [t.flip(-1) if route >= 2 else t for t in inputs], "tl_hv"
        sl = slice(route * d, (route + 1) * d)
        out = selective_scan_2d_ref(
            *inputs[:2], -torch.exp(op.A_logs[sl].float()), *inputs[2:], D=op.Ds[sl].float(),
            delta_bias=op.dt_projs_bias[route].float(), direction=direction,
        )
        if op.scan == "cross1d":
            out = (out.flip(-1) if route >= 2 else out)[..., 0, :]
            out = out.unflatten(-1, (h, w)) if route % 2 == 0 else out.unflatten(-1, (w, h)).transpose(-1, -2)
        y = y + out
    return y


@pytest.mark.parametrize("scan", ["2d", "cross1d"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_ss2d_forward_and_gradients_match_einsum_formulation(scan, memory_format):
    """The layout-tuned SS2D computes exactly the plain formulation, outputs and every gradient, on the rows of a map
    in either layout (a channels_last map's rows are contiguous, an NCHW map's strided)."""
    torch.manual_seed(0)
    op = SS2D(d_model=6, d_state=2, ssm_ratio=2.0, dt_rank=3, scan=scan, scan_backend="reference").double()
    x = torch.randn(2, 6, 4, 7, dtype=torch.float64).to(memory_format=memory_format).requires_grad_()
    rows = x.permute(0, 2, 3, 1)
    seed = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    got = op(rows)
    got_grads = torch.autograd.grad((got * seed).sum(), [x, *op.parameters()])

    maps = op.act(op.conv2d(torch.einsum("bdhw,ed->behw", x, op.in_proj.weight)))
    expected = op.out_proj(op.out_norm(_routes_by_einsum(op, maps).permute(0, 2, 3, 1)))
    expected_grads = torch.autograd.grad((expected * seed).sum(), [x, *op.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    names = ["x"] + [name for name, _ in op.named_parameters()]
    for name, g, e in zip(names, got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("arch", ["vmamba2d_nano", "vmamba_nano"])
def test_models_hand_the_scan_a_low_rank_delta(arch, monkeypatch):
    """Every SS2D gives the scan its dts (rank r) and dt_proj weight (`delta_proj`), dts as a view of x_dbl (no copy
    for the 2D routes); a training step in float64 gives the same output and parameter gradients as the scan on
    the full delta expanded before the call (dt_proj as an einsum, the computation SS2D ran before)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=3, scan_backend="reference").double()
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    calls = []
    real_scan = vmamba.selective_scan_2d

    def step():
        model.zero_grad()
        loss = model(x).square().sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    def recording(*args, delta_proj=None, **kwargs):
        calls.append((args[1], delta_proj))
        return real_scan(*args, delta_proj=delta_proj, **kwargs)

    def expanded(u, delta, *args, delta_proj=None, **kwargs):
        full = torch.einsum("gdr,bgrhw->bgdhw", delta_proj, delta).flatten(1, 2)
        return real_scan(u, full, *args, **kwargs)

    monkeypatch.setattr(vmamba, "selective_scan_2d", recording)
    loss, grads = step()
    ops = [m for m in model.modules() if isinstance(m, SS2D)]
    assert len(calls) == len(ops)  # one call per mixer: its four routes, 2D or the 1D cross-scan's
    for (delta, proj), op in zip(calls, ops):
        assert proj is op.dt_projs_weight  # the weight itself, no copy
        assert delta.shape[1:3] == (4, op.dt_rank)
        assert not delta.is_contiguous()  # a view of x_dbl
    monkeypatch.setattr(vmamba, "selective_scan_2d", expanded)
    want_loss, want_grads = step()
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("scan", ["2d", "cross1d"])
def test_ss2d_hands_the_scan_its_routes_without_slicing(scan, monkeypatch):
    """No tensor SS2D gives the scan (maps or route parameters) comes from a slice or a select: the backward of
    each zeroes a full-size gradient and copies into it (two launches on a GPU), where the full tensor itself (the
    2D routes) or one unbind of the route pairs (the 1D cross-scan: one stack for both halves) costs none or one."""
    op = SS2D(16, scan=scan, scan_backend="reference")
    calls = []
    real_scan = vmamba.selective_scan_2d

    def recording(*args, **kwargs):
        calls.append([*args, *kwargs.values()])
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(vmamba, "selective_scan_2d", recording)
    op(torch.randn(2, 5, 7, 16))  # (B, H, W, C) rows
    assert len(calls) == 1
    nodes, stack = set(), [t.grad_fn for call in calls for t in call if isinstance(t, torch.Tensor)]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            stack.extend(parent for parent, _ in node.next_functions)
    kinds = {type(node).__name__ for node in nodes}
    assert "ExpBackward0" in kinds and kinds & {"MmBackward0", "BmmBackward0"}  # it reached the parameters, x_proj
    assert not kinds & {"SliceBackward0", "SelectBackward0"}


def _dim_order(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(sorted((i for i in range(t.dim()) if t.shape[i] > 1), key=lambda i: -t.stride(i)))


class _LayoutAudit(TorchDispatchMode):
    """Records the copies (elements written by clone / copy_ / same-dtype _to_copy), layer norms of non-contiguous
    inputs (they copy inside, forward and backward) and element-wise ops whose same-shape inputs differ in layout
    (strided kernels) among the aten ops dispatched while active."""

    COPIES = ("clone", "copy_", "_to_copy")

    def __init__(self):
        super().__init__()
        self.copies, self.strided_layer_norms, self.mixed_layouts = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in self.COPIES:
            if name != "_to_copy" or out.dtype == tensors[0].dtype:
                self.copies.append((name, tuple(out.shape), out.numel()))
        elif name in ("native_layer_norm", "native_layer_norm_backward"):
            normalized = tensors[1] if name.endswith("backward") else tensors[0]
            if not normalized.is_contiguous():
                self.strided_layer_norms.append(tuple(normalized.shape))
        elif torch.Tag.pointwise in func.tags:
            maps = [t for t in tensors if t.dim() >= 3 and t.numel() > 1 and t.shape == tensors[0].shape]
            if len({_dim_order(t) for t in maps}) > 1:
                self.mixed_layouts.append((name, tuple(tensors[0].shape)))
        return out


def test_block_layout_copies():
    """One VSSBlock training step on a channels_last stream copies only what the design must copy.

    Forward: u (one NCHW copy of x that the four routes share); dt_proj runs inside the scan op, on its low-rank
    delta, and the op writes the sum over the routes channels_last in the pass that sums them (the shape-only scan
    runs neither and returns zeros in that layout). Backward: u's gradient (the scan's sum over the routes, NCHW)
    turned channels_last; the output gradient goes to the op as it comes, channels_last (the CUDA backward turns it
    NCHW for its four routes, which read it in place). Nothing else: no layer norm of a strided tensor, no
    element-wise op mixing layouts, no other gradient that has to be transposed to its tensor's layout.
    """
    torch.manual_seed(0)
    b, dim, h, w = 2, 16, 5, 7
    block = VSSBlock(dim, d_state=2, ssm_ratio=2.0, scan_backend="shape_only")  # zeros in the kernels' layouts
    d = block.op.d_inner
    x = torch.randn(b, dim, h, w).to(memory_format=torch.channels_last).requires_grad_()
    with _LayoutAudit() as audit:
        y = block(x)
        y.backward(torch.randn_like(y))

    design = {"u": b * d * h * w, "u gradient": b * d * h * w}
    assert len(audit.copies) <= len(design), audit.copies
    assert sum(numel for *_, numel in audit.copies) <= sum(design.values()), audit.copies
    assert audit.strided_layer_norms == [] and audit.mixed_layouts == []
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in (y, x.grad))


def test_cross1d_block_layout_copies():
    """VMamba's 1D cross-scan block moves what its design must and no more: forward, x's NCHW copy (the row-major
    routes' order) and its transposed copy (the column-major routes'), each written into its half of the scan's u
    of two blocks, the routes' dts, B and C in their routes' order (r + 2N channels each), and the merge of the two
    blocks' route sums, one pass adding the column-major one transposed; backward, the same steps on the
    gradients. No other copy or concatenation: no copy of x per route (VMamba's cross-scan makes four), no gathered
    parameters (one scan call)."""
    torch.manual_seed(0)
    b, dim, h, w = 2, 16, 5, 7
    block = VSSBlock(dim, d_state=2, ssm_ratio=2.0, scan_backend="shape_only", scan="cross1d")
    d, r, n = block.op.d_inner, block.op.dt_rank, block.op.d_state
    x = torch.randn(b, dim, h, w).to(memory_format=torch.channels_last).requires_grad_()
    maps = b * d * h * w
    with _LayoutAudit() as audit, _Stacks(maps) as stacks:
        y = block(x)
        y.backward(torch.randn_like(y))
    route_maps = b * 4 * (r + 2 * n) * h * w  # all four routes' dts, B and C
    assert sum(numel for *_, numel in audit.copies) <= 4 * maps + 2 * route_maps, audit.copies
    assert stacks.large == [], stacks.large
    assert audit.strided_layer_norms == [] and audit.mixed_layouts == [("add", (b, d, h, w))] * 2
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in (y, x.grad))


class _Stacks(TorchDispatchMode):
    """Records the concatenations that write at least `size` elements."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.large = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in ("cat", "stack") and out.numel() >= self.size:
            self.large.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("scan", ["2d", "cross1d"])
def test_ss2d_compiles_as_one_graph(scan):
    """torch.compile(fullgraph=True) traces both mixers, their layout Functions (the NCHW copies, the cross-merge)
    included, with no graph break; output and input gradient equal eager's (reference scan, AOT eager backend)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    mixer = SS2D(16, scan=scan, scan_backend="reference")
    x = torch.randn(2, 5, 7, 16).requires_grad_()  # (B, H, W, C) rows
    eager = mixer(x)
    eager.square().sum().backward()
    grad, x.grad = x.grad, None
    out = torch.compile(mixer, fullgraph=True, backend="aot_eager")(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, grad, rtol=1e-6, atol=1e-6)
    assert out.is_contiguous()


def test_backbone_stream_stays_channels_last():
    """From the input on, no layer norm copies and no element-wise op mixes layouts in a whole training step."""
    torch.manual_seed(0)
    model = timm.create_model("vmamba2d_nano", num_classes=3, scan_backend="shape_only")
    x = torch.randn(2, 3, 48, 80)
    with _LayoutAudit() as audit:
        F.cross_entropy(model(x), torch.tensor([0, 2])).backward()
    assert audit.strided_layer_norms == [] and audit.mixed_layouts == []
    stages = model.forward_intermediates(x, intermediates_only=True)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in stages)


def test_block_norms_feed_gemms_in_the_autocast_dtype():
    """Under autocast a block's norms (outputs only read by GEMMs) normalise in the low dtype, while the residual
    stream stays float32; without autocast they are plain layer norms (same parameters, same values)."""
    torch.manual_seed(0)
    block = VSSBlock(16, d_state=1, ssm_ratio=2.0)
    with torch.no_grad():
        for norm in (block.norm, block.norm2, block.op.out_norm):
            norm.weight.normal_()
            norm.bias.normal_()
    x = torch.randn(2, 16, 5, 7).to(memory_format=torch.channels_last)
    rows = x.permute(0, 2, 3, 1)  # what the block's norms normalise
    for norm in (block.norm, block.norm2):
        plain = F.layer_norm(rows, (16,), norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(norm(rows), plain, rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = norm(rows)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), plain, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(x).dtype == torch.float32
    model = timm.create_model("vmamba2d_nano", num_classes=3)
    for name, module in model.named_modules():
        if isinstance(module, vmamba.GemmInputLayerNorm):
            assert name.endswith(("norm", "norm2", "out_norm")) and ".blocks." in name, name



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_drop_scale_draws_what_timm_drop_path_draws(dtype):
    """The fused residual norm's per-sample drop-path factor comes from the same generator calls as timm's DropPath
    on the same branch and rounds as it does: the branch it scales equals DropPath's output bitwise."""
    block = VSSBlock(8, drop_path=0.4, scan_backend="reference").train()
    branch = torch.randn(6, 8, 3, 5).to(dtype)
    torch.manual_seed(3)
    want = block.drop_path(branch)
    torch.manual_seed(3)
    scale = block._drop_scale(branch)
    assert scale.dtype == torch.float32 and scale.shape == (6,)
    assert torch.equal(branch * scale.to(dtype).view(-1, 1, 1, 1), want)
    assert set(scale.tolist()) <= {0.0, (torch.tensor(1.0, dtype=dtype) / 0.6).item()}
    assert block.eval()._drop_scale(branch) is None
    assert VSSBlock(8, scan_backend="reference").train()._drop_scale(branch) is None  # no drop path


@pytest.mark.parametrize("arch", ["vmamba2d_nano", "vmamba_nano"])
def test_stage_chain_computes_what_block_calls_compute(arch, monkeypatch):
    """A stage hands each block's last residual sum to the next block's first norm (`VSSBlock.forward_deferred`);
    with a hook on its blocks it calls them as modules instead. Both give the same output and gradients bitwise, with
    the same drop-path draws, and every hook sees each of its block's calls."""
    handed = []
    deferred = VSSBlock.forward_deferred
    monkeypatch.setattr(VSSBlock, "forward_deferred",
                        lambda self, stream: handed.append(len(stream) > 1) or deferred(self, stream))
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=5, drop_path_rate=0.3, scan_backend="reference").train()
    x = torch.randn(2, 3, 48, 40)
    results, seen = [], []
    for hooked in (False, True):
        handles = [block.register_forward_hook(lambda module, args, out: seen.append(out.shape))
                   for layer in model.layers for block in layer.blocks] if hooked else []
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
        for handle in handles:
            handle.remove()
    (out_c, grads_c), (out_b, grads_b) = results
    depths = [len(layer.blocks) for layer in model.layers]
    # chained: every block but a stage's first takes a sum over; called as modules: none does
    assert handed == [i > 0 for depth in depths for i in range(depth)] + [False] * sum(depths)
    assert torch.equal(out_c, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_c, grads_b))
    assert len(seen) == sum(len(layer.blocks) for layer in model.layers)


def test_block_forward_is_its_deferred_parts_summed():
    """`VSSBlock.forward` is `forward_deferred`'s (x, branch, scale) summed, and both compute timm's modules composed
    as the block's equations say (pre-norm residual branches with DropPath), with the same draws."""
    block = VSSBlock(16, drop_path=0.5, scan_backend="reference").train()
    x = torch.randn(3, 16, 6, 5).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(4)
    out = block(x)
    rows = x.permute(0, 2, 3, 1)  # the block works on the map's (B, H, W, C) rows
    torch.manual_seed(4)
    stream = [rows]
    mid, branch, scale = block.forward_deferred(stream)
    assert stream == []  # emptied, so the caller holds no summed map
    assert out.is_contiguous(memory_format=torch.channels_last)
    out = out.permute(0, 2, 3, 1)
    assert scale is not None and torch.equal(out, mid + branch * scale.view(-1, 1, 1, 1))
    torch.manual_seed(4)
    x1 = rows + block.drop_path(block.op(block.norm(rows)))
    assert torch.equal(out, x1 + block.drop_path(block.mlp(block.norm2(x1))))


def test_deferred_block_frees_the_summed_stream_before_its_token_mixer():
    """Once a block has summed the stream it was handed, neither the block nor the caller keeps the old stream or
    branch: by the time the token mixer runs, both are freed (a map each of peak memory otherwise)."""
    block = VSSBlock(8, scan_backend="reference").eval()
    x, branch = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 4, 8)  # (B, H, W, C) rows
    refs = [weakref.ref(x), weakref.ref(branch)]
    freed = []
    block.op.register_forward_pre_hook(lambda module, args: freed.append([ref() is None for ref in refs]))
    stream = [x, branch, None]
    del x, branch
    with torch.no_grad():
        block.forward_deferred(stream)
    assert freed == [[True, True]]


def test_whole_model_traces_as_one_graph():
    """torch.compile(fullgraph=True) traces a whole backbone, its stages' block chain included, without a break, and
    the traced model computes what the eager one does."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("vmamba2d_nano", num_classes=5, scan_backend="reference").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.compile(model, fullgraph=True, backend="eager")(x)
        assert torch.allclose(traced, model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_whole_model_trains_as_one_graph():
    """The same in training mode with the backward: the stages' deferred residual sums (the stream each block hands
    the next) trace without a break, and the traced step gives eager's logits and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("vmamba2d_nano", num_classes=5, scan_backend="reference", drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)
    eager.square().sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    traced = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    traced.square().sum().backward()
    assert torch.allclose(traced, eager, rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.cat([p.grad.flatten() for p in model.parameters()]), grads, rtol=1e-4, atol=1e-6)
