"""End to end on the GPU: models give the same loss and gradients with the CUDA scan as with the reference (fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

from mamba2d.ops import cuda_build, cuda_scan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_scan.cupy_importable(), reason="needs CuPy (mamba2d[cuda12] or [cuda13])"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _set_backend(model: torch.nn.Module, backend: str) -> None:
    for module in model.modules():
        if hasattr(module, "scan_backend"):
            module.scan_backend = backend


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _compare(model, make_loss, bound=1e-4):
    results = {}
    for backend in ("reference", "cuda"):
        m = copy.deepcopy(model)
        _set_backend(m, backend)
        loss = make_loss(m)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters()
                                            if p.grad is not None})
    (loss_ref, grads_ref), (loss_cuda, grads_cuda) = results["reference"], results["cuda"]
    assert _rel(loss_cuda, loss_ref) <= bound
    assert grads_ref.keys() == grads_cuda.keys() and grads_ref
    bad = {n: _rel(grads_cuda[n], g) for n, g in grads_ref.items() if not _rel(grads_cuda[n], g) <= bound}
    assert not bad, f"gradients off by more than {bound}: {bad}"


def test_vmamba2d_tiny_matches_reference():
    import timm

    import mamba2d  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    model = timm.create_model("vmamba2d_tiny", scan_backend="reference").cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    target = torch.tensor([3, 7], device="cuda")
    _compare(model, lambda m: torch.nn.functional.cross_entropy(m(x), target))


def test_mil_sized_block_matches_reference():
    from mamba2d.models.mil_mamba import MambaBlock

    torch.manual_seed(0)
    block = MambaBlock(128, d_state=16, directions=("tl_hv", "tl_vh", "br_hv", "br_vh"), scan_backend="reference",
                       scan_memory_mb=None).cuda()
    x = torch.randn(1, 128, 40, 52, device="cuda")
    w = torch.randn(1, 128, 40, 52, device="cuda")
    _compare(block, lambda m: (m(x) * w).sum())


def test_compiled_ss2d_block_has_no_graph_break():
    """torch.compile(fullgraph=True) of a real 2DVMamba mixer (SS2D) with the CUDA scan."""
    import timm

    import mamba2d  # noqa: F401

    torch._dynamo.reset()
    model = timm.create_model("vmamba2d_tiny", scan_backend="cuda").cuda()
    ss2d = next(m for m in model.modules() if type(m).__name__ == "SS2D")
    x = torch.randn(2, 28, 28, ss2d.in_proj.in_features, device="cuda", requires_grad=True)  # (B, H, W, C) rows
    eager = ss2d(x)
    eager.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    compiled = torch.compile(ss2d, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    assert _rel(out, eager) <= 1e-4
    assert _rel(x.grad, grad) <= 1e-4


def test_compiled_backbone_training_step_matches_eager():
    """torch.compile(fullgraph=True) of a whole backbone in training mode (its stages' deferred residual sums
    included) traces on the installed torch and gives eager's logits and gradients."""
    import timm

    import mamba2d  # noqa: F401

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("vmamba2d_nano", num_classes=7, drop_path_rate=0.0).cuda().train()
    x = torch.randn(4, 3, 64, 48, device="cuda")
    eager = model(x)
    eager.square().sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, fullgraph=True)(x)
    out.square().sum().backward()
    assert _rel(out, eager) <= 1e-4
    assert _rel(torch.cat([p.grad.flatten() for p in model.parameters()]), grads) <= 1e-3


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_training_step_matches_eager(precision):
    """The scan and layer-norm kernels can be captured: vmamba2d_nano's forward and backward replayed as CUDA graphs
    (`torch.cuda.make_graphed_callables`, as `mamba2d throughput --cuda_graph true` runs them) give eager's loss and
    gradients, step after step, on new batches copied into the captured one."""
    import timm

    import mamba2d  # noqa: F401

    torch.manual_seed(0)
    eager = timm.create_model("vmamba2d_nano", drop_path_rate=0.0).cuda().train()
    graphed = copy.deepcopy(eager)
    low = precision == "fp16"

    def autocast():
        return torch.autocast("cuda", dtype=torch.float16, enabled=low, cache_enabled=False)

    with autocast():
        graphed = torch.cuda.make_graphed_callables(graphed, (torch.randn(4, 3, 32, 32, device="cuda"),))
    bound = 2e-3 if low else 1e-5
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32, device="cuda")
        target = torch.randint(0, eager.num_classes, (4,), device="cuda")
        results = []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x).float(), target)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (loss_eager, grads_eager), (loss_graph, grads_graph) = results
        assert _rel(loss_graph, loss_eager) <= bound
        bad = [i for i, (g, e) in enumerate(zip(grads_graph, grads_eager)) if not _rel(g, e) <= bound]
        assert not bad, f"parameters {bad} get other gradients under graph replay"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_reduce_overhead_training_steps_match_default_compile(precision):
    """torch.compile(mode="reduce-overhead"): the whole backbone's forward and backward captured and replayed as CUDA
    graphs by torch.compile itself (the scan and norm kernels read no tensor that the ops cache, which its memory
    pool forbids) give the loss and gradients of the same compiled kernels run without graphs, step after step, on
    new batches (compiled against eager: test_compiled_backbone_training_step_matches_eager)."""
    import timm

    import mamba2d  # noqa: F401

    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = timm.create_model("vmamba2d_nano", drop_path_rate=0.0).cuda().train()
    graphed = copy.deepcopy(plain)
    runs = ((plain, torch.compile(plain)), (graphed, torch.compile(graphed, mode="reduce-overhead")))
    for _ in range(4):  # warm-up, capture, replays
        x = torch.randn(4, 3, 32, 32, device="cuda")
        target = torch.randint(0, plain.num_classes, (4,), device="cuda")
        results = []
        for model, run in runs:
            model.zero_grad(set_to_none=True)
            torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
                loss = torch.nn.functional.cross_entropy(run(x).float(), target)
            loss.backward()
            results.append((loss.detach().clone(), [p.grad.clone() for p in model.parameters()]))
        (loss_plain, grads_plain), (loss_graphed, grads_graphed) = results
        assert _rel(loss_graphed, loss_plain) <= 1e-6
        bad = [i for i, (g, e) in enumerate(zip(grads_graphed, grads_plain)) if not _rel(g, e) <= 1e-6]
        assert not bad, f"parameters {bad} get other gradients under the compiled graphs"


def test_compiled_mil_training_step_matches_eager():
    """torch.compile of 2DMambaMIL (the grid's scatter and gather around the wavefront scan) trains as eager does on
    the installed torch: same logits and gradients."""
    from mamba2d.models.mil import create_mil_model

    torch._dynamo.reset()
    torch.manual_seed(0)
    height, width, patches = 64, 96, 3000
    assert cuda_build.uses_wave(1, 256, height, width, 1, 16)  # the paper's 256 scan channels and 16 states
    cells = torch.randperm(height * width)[:patches]
    positions = torch.stack([cells // width, cells % width], 1).cuda()
    features = torch.randn(patches, 64, device="cuda")
    eager = create_mil_model("mamba_mil_2d", 64, 3, dropout=0.0).cuda().train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    results = []
    for model, run in ((eager, eager), (compiled_model, compiled)):
        logits = run(features, positions).logits
        torch.nn.functional.cross_entropy(logits.reshape(1, -1), torch.tensor([2], device="cuda")).backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    (logits_eager, grads_eager), (logits_compiled, grads_compiled) = results
    assert _rel(logits_compiled, logits_eager) <= 1e-4
    # The attention score's bias shifts every score alike, which the softmax cancels: its gradient is zero in exact
    # arithmetic, so both runs hold rounding noise there and a relative comparison would compare noise with noise.
    names = [name for name, _ in compiled_model.named_parameters()]
    scale = max(g.double().norm().item() for g in grads_eager)
    for name, g, e in zip(names, grads_compiled, grads_eager):
        if name == "pool.score.bias":
            assert max(g.double().norm().item(), e.double().norm().item()) <= 1e-6 * scale
    compared = [(n, g, e) for n, g, e in zip(names, grads_compiled, grads_eager) if n != "pool.score.bias"]
    bad = [n for n, g, e in compared if not _rel(g, e) <= 1e-3]
    assert not bad, f"parameters {bad} get other gradients when compiled"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scan", ["2d", "cross1d"])
def test_route_sum_keeps_the_autocast_dtype(dtype, scan):
    """Under fp16 / bf16 autocast every mixer's route sum reaches out_norm in the autocast dtype with the CUDA scan,
    as with the reference (a float32 sum would double the bytes of that map, its layout copy and its gradient)."""
    from mamba2d.models.vmamba import SS2D

    torch.manual_seed(0)
    seen = {}
    for backend in ("reference", "cuda"):
        mixer = SS2D(48, scan=scan, scan_backend=backend).cuda()
        dtypes = []
        mixer.out_norm.register_forward_hook(lambda module, args, out: dtypes.append(args[0].dtype))
        x = torch.randn(2, 20, 28, 48, device="cuda")  # (B, H, W, C) rows
        with torch.autocast("cuda", dtype=dtype):
            mixer(x.requires_grad_()).float().square().sum().backward()
        seen[backend] = dtypes
    assert seen["cuda"] == seen["reference"] == [dtype]
