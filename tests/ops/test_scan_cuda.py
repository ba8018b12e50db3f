"""GPU tests of the CUDA 2D selective scan against the float64 reference (contract: docs/scan.md).

Run with `pytest -m gpu`; skipped without a CUDA device or CuPy. Every kernel run through `run` (the CUDA op with
`poison_outputs=True` and the test's `ScanTuning`) has its outputs and scratch poisoned with NaN first, inputs are
fresh random draws, and errors are ||out - ref|| / ||ref|| against the reference in float64 on the same (rounded)
inputs.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mamba2d.ops import DIRECTIONS, contract, cuda_build, cuda_scan, selective_scan_2d
from mamba2d.ops.cuda_build import DEFAULT_TUNING, ScanTuning
from mamba2d.ops.library import selective_scan_2d_cuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_scan.cupy_importable(), reason="needs CuPy (mamba2d[cuda12] or [cuda13])"),
]

BOUND = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
_seed = itertools.count(1234)


def make_inputs(batch, dim, H, W, G, N, dtype=torch.float32, z=True, D=True, bias=True, delta_scale=1.0,
                A_scale=1.0, device="cuda"):
    gen = torch.Generator(device="cpu").manual_seed(next(_seed))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    inputs = {
        "u": rnd(batch, dim, H, W).to(dtype),
        "delta": (rnd(batch, dim, H, W, scale=delta_scale) - 1.0).to(dtype),
        "A": -torch.exp(rnd(dim, N, scale=0.5)) * A_scale,
        "B": rnd(batch, G, N, H, W).to(dtype),
        "C": rnd(batch, G, N, H, W).to(dtype),
        "D": rnd(dim) if D else None,
        "z": rnd(batch, dim, H, W).to(dtype) if z else None,
        "delta_bias": rnd(dim, scale=0.5) if bias else None,
    }
    return inputs


def run(inputs, backend, dy=None, out_dtype=None, direction="tl_hv", softplus=True, grad=True, cast=None,
        tuning=DEFAULT_TUNING, sum_groups=False, channels_last=False):
    """Forward (and backward, with `grad`) of the scan on `backend`; "cuda" runs the kernels with `tuning` and with
    every output and scratch buffer poisoned with NaN before each launch."""
    leaves = {}
    for name, t in inputs.items():
        if t is None:
            leaves[name] = None
            continue
        t = t.detach()
        if cast is not None:
            t = t.to(cast)
        leaves[name] = t.requires_grad_(grad)
    if backend == "cuda":
        y = selective_scan_2d_cuda(**leaves, delta_softplus=softplus, direction=direction, out_dtype=out_dtype,
                                   tuning=tuning, poison_outputs=True, sum_groups=sum_groups,
                                   channels_last=channels_last)
    else:
        y = selective_scan_2d(**leaves, delta_softplus=softplus, direction=direction, out_dtype=out_dtype,
                              backend=backend, sum_groups=sum_groups, channels_last=channels_last)
    grads = {}
    if grad:
        if dy is None:
            dy = torch.randn(y.shape, generator=torch.Generator(device="cpu").manual_seed(next(_seed))).to(y.device)
            dy = dy.to(y.dtype)  # the reference then sees the same rounded gradient
        y.backward(dy.to(y.dtype))
        grads = {n: leaves[n].grad for n in GRAD_NAMES if leaves[n] is not None}
    return y, grads, dy


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values (unwritten or overflowing outputs)"
    denom = ref.norm().item()
    return (out - ref).norm().item() / max(denom, 1e-30)


def check_against_reference(inputs, direction, out_dtype=None, softplus=True, bound=None, tuning=DEFAULT_TUNING,
                            sum_groups=False):
    dtype = inputs["u"].dtype
    bound = bound or BOUND[dtype]
    y, grads, dy = run(inputs, "cuda", out_dtype=out_dtype, direction=direction, softplus=softplus, tuning=tuning,
                       sum_groups=sum_groups)
    y_ref, grads_ref, _ = run(inputs, "reference", dy=dy, direction=direction, softplus=softplus, cast=torch.float64,
                              sum_groups=sum_groups)
    assert y.dtype == (out_dtype or dtype)
    errors = {"y": rel_err(y, y_ref)}
    for name, g in grads_ref.items():
        assert grads[name] is not None, f"no gradient for {name}"
        assert grads[name].dtype == inputs[name].dtype and grads[name].shape == inputs[name].shape
        errors["d" + name] = rel_err(grads[name], g)
    bad = {k: v for k, v in errors.items() if not v <= bound}
    assert not bad, f"relative errors above {bound}: {bad} (all: {errors})"
    return errors


def group_directions(G, offset=0):
    return [DIRECTIONS[(g + offset) % len(DIRECTIONS)] for g in range(G)]


SHAPES = [(1, 1), (1, 4096), (4096, 1), (5, 7), (11, 13), (37, 70), (56, 56), (130, 33), (200, 300)]


@pytest.mark.parametrize("H,W", SHAPES)
def test_shapes_fp32_all_grads(H, W):
    G = 4
    inputs = make_inputs(2 if H * W < 10000 else 1, 8, H, W, G, 4, z=(H + W) % 2 == 0)
    check_against_reference(inputs, group_directions(G, offset=H % 8))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("H,W,N", [(5, 7, 1), (37, 70, 4), (20, 600, 2)])
def test_every_direction(direction, H, W, N):
    inputs = make_inputs(2, 4, H, W, 1, N, z=N != 2)
    check_against_reference(inputs, direction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_fp32", [False, True])
@pytest.mark.parametrize("z", [False, True])
@pytest.mark.parametrize("H,W", [(56, 56), (130, 33), (14, 14), (29, 28), (5, 17)])
def test_low_precision_dtypes(dtype, out_fp32, z, H, W):
    """16-bit inputs on every row layout: narrow, one warp with 1 column per thread (17-32 wide: loads a band ahead)
    or 2, several warps."""
    inputs = make_inputs(2, 8, H, W, 4, 4, dtype=dtype, z=z)
    check_against_reference(inputs, ["tl_hv", "tl_vh", "br_hv", "br_vh"], out_dtype=torch.float32 if out_fp32 else None)


@pytest.mark.parametrize("N", [1, 4, 16])
@pytest.mark.parametrize("H,W", [(14, 14), (37, 70)])
def test_shared_group_256_channels(N, H, W):
    """G = 1: all 256 channels share B/C, so dB/dC sum over channels (upstream's race)."""
    inputs = make_inputs(1, 256, H, W, 1, N, z=True)
    check_against_reference(inputs, "br_vh")


def wavefront(states_per_lane=DEFAULT_TUNING.wave_states_per_lane) -> ScanTuning:
    """The wavefront kernels on every shape whose tiles fit."""
    return ScanTuning(force_wavefront=True, wave_states_per_lane=states_per_lane)


@pytest.mark.parametrize("wave", [False, True])
@pytest.mark.parametrize("target,parts", [(0, 1), (12, 6), (10**9, 16)])
@pytest.mark.parametrize("dtype,z", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True),
                                     (torch.float16, False)])
@pytest.mark.parametrize("H,W,G", [(37, 70, 2), (20, 300, 1), (14, 14, 2)])
def test_state_split(wave, target, parts, dtype, z, H, W, G):
    """N = 16 states unsplit, in parts of 3 (the last one smaller) and one per block: partial y / du / ddelta / dD /
    d(delta_bias) summed by the launcher, the z gate applied outside the kernel; all against the reference. The
    kernels per-band or wavefront (`wave`: never split)."""
    batch, dim, N = 1, 2 * G, 16
    # launches below `target` (batch, group, channel chunk) blocks split their states (0: never)
    tuning = ScanTuning(split_target_blocks=target, force_wavefront=wave,
                        wave_min_states=DEFAULT_TUNING.wave_min_states if wave else cuda_build.MAX_D_STATE + 1)
    assert cuda_build.uses_wave(batch, dim, H, W, G, N, tuning) == wave
    cfg = cuda_build.launch_config(batch, dim, H, W, G, N, tuning=tuning)
    assert cfg.blocks == 2 and cfg.parts == parts  # the targets above assume two blocks
    assert cuda_build.launch_config(batch, dim, H, W, G, N, backward=True, tuning=tuning).parts == parts
    inputs = make_inputs(batch, dim, H, W, G, N, dtype=dtype, z=z)
    check_against_reference(inputs, group_directions(G, offset=W % 8), tuning=tuning)


@pytest.mark.parametrize("N", [32, 64])
def test_large_state(N):
    inputs = make_inputs(1, 4, 9, 40, 2, N)
    check_against_reference(inputs, ["tr_hv", "bl_vh"])


def test_no_softplus_no_optional_inputs():
    inputs = make_inputs(2, 6, 11, 23, 3, 2, z=False, D=False, bias=False)
    inputs["delta"] = inputs["delta"].abs() * 0.3
    check_against_reference(inputs, ["tl_hv", "br_vh", "tr_vh"], softplus=False)


def channels_last_view(t):
    """The same values stored channels-last (the channel stride is 1)."""
    return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def strided_columns(t):
    """The same values as every other column of a map twice as wide (column stride 2)."""
    wide = torch.randn(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def test_non_contiguous_inputs():
    b, dim, H, W, G, N = 2, 8, 19, 45, 4, 3
    base = make_inputs(b, dim, H, W, G, N)
    inputs = dict(base)
    # u channels-last, delta a strided slice, B/C with a stride-0 group dimension, z transposed storage.
    inputs["u"] = channels_last_view(base["u"])
    inputs["delta"] = strided_columns(base["delta"])
    inputs["B"] = base["B"][:, :1].expand(b, G, N, H, W)
    inputs["C"] = base["C"][:, 1:2].expand(b, G, N, H, W)
    inputs["z"] = base["z"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not inputs["u"].is_contiguous() and not inputs["delta"].is_contiguous()
    assert inputs["B"].stride(1) == 0
    check_against_reference(inputs, group_directions(G, 3))
    # A stride-0 incoming gradient (from y.sum()) and stride-0 expanded u across channels.
    inputs = make_inputs(1, 4, 6, 33, 1, 2)
    inputs["u"] = inputs["u"][:, :1].expand(1, 4, 6, 33)
    y, grads, _ = run(inputs, "cuda", dy=torch.ones(1, 4, 6, 33, device="cuda"), direction="tl_vh")
    y_ref, grads_ref, _ = run(inputs, "reference", dy=torch.ones(1, 4, 6, 33, device="cuda"), direction="tl_vh",
                              cast=torch.float64)
    assert rel_err(y, y_ref) <= 1e-5
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) <= 1e-5, name


@pytest.mark.parametrize("layout,dtype", [("contiguous", torch.float32), ("contiguous", torch.bfloat16),
                                          ("misaligned", torch.float32), ("channels_last", torch.bfloat16)])
@pytest.mark.parametrize("H,W", [(5, 128), (7, 14), (9, 56), (3, 300), (6, 300), (1, 256)])
def test_vector_access_layouts(layout, dtype, H, W):
    """K-wide vector loads and stores (W % K == 0: narrow, warp-row, wide and 1D layouts) in all eight directions,
    with inputs that allow vector loads and with inputs that do not (an address one element off, strided columns):
    then only the stores are vectors."""
    G = 4
    inputs = make_inputs(2, 8, H, W, G, 2, dtype=dtype, z=W % 4 == 0)
    if layout == "misaligned":
        for name in ("u", "B"):
            t = inputs[name]
            wide = torch.zeros(*t.shape[:-1], W + 1, dtype=t.dtype, device=t.device)
            wide[..., 1:] = t
            inputs[name] = wide[..., 1:]
    elif layout == "channels_last":
        inputs["delta"] = inputs["delta"].contiguous(memory_format=torch.channels_last)
    plan = cuda_scan.plan_for(inputs["u"], inputs["B"], backward=False, has_z=inputs["z"] is not None,
                              out_fp32=False)
    flags = cuda_scan._vector_flags(plan, tuple(inputs[n] for n in ("u", "delta", "z", "B", "C")))
    assert plan.band.K > 1 and flags == (3 if layout == "contiguous" else 2)
    for offset in (0, 4):
        check_against_reference(inputs, group_directions(G, offset))


@pytest.mark.parametrize("H,W,G,dim,N", [(37, 70, 1, 256, 4), (3, 1000, 2, 8, 8), (14, 14, 4, 64, 1),
                                         (20, 300, 1, 16, 16)])
def test_deterministic_bitwise(H, W, G, dim, N):
    if N == 16:  # states split over blocks: the partial sums too are added in a fixed order
        assert cuda_build.launch_config(2, dim, H, W, G, N).parts > 1
    inputs = make_inputs(2, dim, H, W, G, N)
    dy = torch.randn(2, dim, H, W, device="cuda")
    directions = group_directions(G)
    first_y, first, _ = run(inputs, "cuda", dy=dy, direction=directions)
    for _ in range(5):
        y, grads, _ = run(inputs, "cuda", dy=dy, direction=directions)
        assert torch.equal(y, first_y)
        for name, g in grads.items():
            assert torch.equal(g, first[name]), f"d{name} differs between runs"


@pytest.mark.parametrize("wave", [False, True])
def test_extreme_values_finite(wave):
    inputs = make_inputs(1, 2, 64, 64, 1, 4, z=True)
    inputs["delta"] = torch.linspace(-30, 30, 64 * 64, device="cuda").reshape(1, 1, 64, 64).expand(1, 2, 64, 64)
    inputs["A"] = torch.tensor([[-1e4, -1.0, -1e-4, -30.0]], device="cuda").expand(2, 4).contiguous()
    y, grads, _ = run(inputs, "cuda", direction="br_hv", tuning=wavefront() if wave else DEFAULT_TUNING)
    assert torch.isfinite(y).all()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
    y_ref, grads_ref, _ = run(inputs, "reference", direction="br_hv", cast=torch.float64)
    assert rel_err(y, y_ref) <= 1e-5


@pytest.mark.parametrize("N", [1, 8])
def test_big_map_2048(N):
    """2048 x 2048 maps: the per-band kernels (N = 1) and the wavefront kernels (N = 8)."""
    assert cuda_build.uses_wave(1, 2, 2048, 2048, 2, N) == (N == 8)
    inputs = make_inputs(1, 2, 2048, 2048, 2, N, z=False, delta_scale=3.0)
    inputs["delta"][0, 0, :8, :8] = 30.0
    check_against_reference(inputs, ["tl_hv", "br_vh"])


@pytest.mark.slow
def test_long_1d_row():
    """H = 1 with W = 4,000,000 (the 1D scan of a huge bag): runs and matches the reference."""
    inputs = make_inputs(1, 2, 1, 4_000_000, 1, 2, z=False)
    check_against_reference(inputs, "tl_hv", bound=1e-5)


@pytest.mark.parametrize("tile_warps", [1, 2, 8])
@pytest.mark.parametrize("H,W,G,dim,N", [(1, 3136, 2, 16, 1), (1, 1000, 2, 8, 2), (1, 2100, 1, 6, 1),
                                         (3, 1000, 2, 8, 2)])
def test_tile_warps_against_reference(tile_warps, H, W, G, dim, N):
    """Rows wider than a warp's columns in tiles of 1, 2 and 8 warps (several channels per block and many tiles at
    one end, one channel and few tiles at the other; maps of several bands keep block-wide tiles), in both row
    directions and the 1D twin's, against float64. A launch this small takes narrow tiles only with a lower
    `split_target_blocks` (which also keeps the states whole)."""
    tuning = ScanTuning(tile_warps=tile_warps, split_target_blocks=1)
    cfg = cuda_build.launch_config(2, dim, H, W, G, N, backward=True, tuning=tuning)
    assert (cfg.WPM <= tile_warps or cfg.nbands > 1) and cfg.parts == 1
    inputs = make_inputs(2, dim, H, W, G, N, z=False)
    directions = ["tl_hv", "tr_hv"] if G == 2 else "br_hv"
    check_against_reference(inputs, directions, tuning=tuning)
    check_against_reference(inputs, directions, tuning=tuning, sum_groups=G > 1)


def test_mamba_1d_directions():
    """The VMamba baseline calls the scan with H = 1 and directions tl_hv / tr_hv."""
    inputs = make_inputs(2, 8, 1, 3136, 2, 1, z=False)
    check_against_reference(inputs, ["tl_hv", "tr_hv"])


def test_auto_backend_and_streams():
    inputs = make_inputs(2, 8, 13, 40, 4, 2)
    directions = group_directions(4)
    y_cuda, _, _ = run(inputs, "cuda", direction=directions, grad=False)
    y_auto, _, _ = run(inputs, "auto", direction=directions, grad=False)
    assert torch.equal(y_cuda, y_auto)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y_side, _, _ = run(inputs, "cuda", direction=directions, grad=False)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(y_cuda, y_side)
    # float64 on the GPU falls back to the reference under "auto".
    y64 = selective_scan_2d(**{k: (v.double() if v is not None and v.dtype == torch.float32 and k in
                                   ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()},
                            direction=directions)
    assert y64.dtype == torch.float64


def test_backward_first_on_fresh_autograd_and_python_threads():
    """A scan whose backward is the first node autograd runs, in a fresh process: its backward thread has no CUDA
    context current yet (a driver launch there fails with CUDA_ERROR_INVALID_CONTEXT unless the launcher makes the
    device's context current); the same from a new Python thread."""
    import subprocess
    import sys

    code = """
import threading, torch
from mamba2d.ops import selective_scan_2d, selective_scan_2d_ref
def step(out):
    g = torch.Generator().manual_seed(0)
    u, delta = (torch.randn(2, 4, 9, 11, generator=g) for _ in range(2))
    B, C = (torch.randn(2, 2, 3, 9, 11, generator=g) for _ in range(2))
    A, dy = -torch.rand(4, 3, generator=g), torch.randn(2, 4, 9, 11, generator=g)
    grads = []
    for backend, device, dtype in (("cuda", "cuda", torch.float32), ("reference", "cpu", torch.float64)):
        leaves = [t.to(device, dtype).requires_grad_() for t in (u, delta, A, B, C)]
        selective_scan_2d(*leaves, backend=backend).backward(dy.to(device, dtype))
        grads.append([t.grad.double().cpu() for t in leaves])
    out.append(max(((a - b).norm() / b.norm()).item() for a, b in zip(*grads)))
errors = []
step(errors)
thread = threading.Thread(target=step, args=(errors,))
thread.start()
thread.join()
print("errors", errors)
assert len(errors) == 2 and max(errors) < 1e-5, errors
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_autocast_bf16():
    inputs = make_inputs(2, 8, 24, 40, 4, 2)
    directions = group_directions(4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, grads, dy = run(inputs, "cuda", direction=directions)
    assert y.dtype == torch.bfloat16
    assert grads["u"].dtype == torch.float32  # gradients flow back through the autocast cast
    rounded = {k: (v.to(torch.bfloat16) if v is not None and k in ("u", "delta", "B", "C", "z") else v)
               for k, v in inputs.items()}
    y_ref, _, _ = run(rounded, "reference", dy=dy, direction=directions, cast=torch.float64)
    assert rel_err(y, y_ref) <= 2e-2


def test_bad_inputs():
    inputs = make_inputs(1, 4, 5, 6, 2, 2)
    with pytest.raises(ValueError, match="A is on cpu"):
        selective_scan_2d(**{**inputs, "A": inputs["A"].cpu()}, backend="cuda")
    with pytest.raises(ValueError, match="N=65"):
        big = make_inputs(1, 4, 5, 6, 2, 65)
        selective_scan_2d(**big, backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        selective_scan_2d(**{k: (v.double() if v is not None and k in ("u", "delta", "B", "C", "z") else v)
                             for k, v in inputs.items()}, backend="cuda")
    with pytest.raises(ValueError, match="divisible"):
        selective_scan_2d(**{**inputs, "B": inputs["B"][:, :1].repeat(1, 3, 1, 1, 1),
                             "C": inputs["C"][:, :1].repeat(1, 3, 1, 1, 1)}, backend="cuda")
    with pytest.raises(ValueError, match="delta must have shape"):
        selective_scan_2d(**{**inputs, "delta": inputs["delta"][..., :5]}, backend="cuda")
    with pytest.raises(TypeError, match="delta has dtype"):
        selective_scan_2d(**{**inputs, "delta": inputs["delta"].half()}, backend="cuda")
    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        selective_scan_2d(**{k: (v.cpu() if v is not None else v) for k, v in inputs.items()}, backend="cuda")


def test_opcheck():
    inputs = make_inputs(1, 4, 5, 20, 2, 2)
    args = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
            inputs["delta_bias"], True, [0, 5], False, True)
    leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.mamba2d.scan2d_fwd.default, leaves)
    y, ckv, ckh = torch.ops.mamba2d.scan2d_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    bargs = (torch.randn_like(y), *[a.detach() for a in args[:8]], ckv, ckh, True, [0, 5])
    torch.library.opcheck(torch.ops.mamba2d.scan2d_bwd.default, bargs)
    # y summed over the two groups: y and the gradient the backward reads have dim / G channels
    summed = (*leaves, None, True)
    torch.library.opcheck(torch.ops.mamba2d.scan2d_fwd.default, summed)
    y, ckv, ckh = torch.ops.mamba2d.scan2d_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in summed])
    assert y.shape == (1, 2, 5, 20)
    torch.library.opcheck(torch.ops.mamba2d.scan2d_bwd.default, (torch.randn_like(y), *bargs[1:]))


def assert_compiled_matches_eager(model, x, leaves):
    """`torch.compile(model, fullgraph=True)` (no graph break) gives the eager output and the eager gradients of
    `leaves` for the loss `out.square().sum()`, to 1e-5."""
    ref = model(x)
    ref.square().sum().backward()
    ref_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    out = torch.compile(model, fullgraph=True)(x)
    out.square().sum().backward()
    assert rel_err(out, ref) <= 1e-5
    for got, want in zip((t.grad for t in leaves), ref_grads):
        assert rel_err(got, want) <= 1e-5


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    dim, G, N, H, W = 16, 4, 2, 12, 12

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(dim // G, dim, 1)
            self.bc = torch.nn.Conv2d(dim // G, 2 * G * N, 1)
            self.A_log = torch.nn.Parameter(torch.zeros(dim, N))
            self.D = torch.nn.Parameter(torch.ones(dim))

        def forward(self, x):
            b = x.shape[0]
            u = self.proj(x)
            bc = self.bc(x).view(b, 2, G, N, H, W)
            y = selective_scan_2d(u, u * 0.5, -torch.exp(self.A_log), bc[:, 0], bc[:, 1], self.D,
                                  direction=["tl_hv", "tl_vh", "br_hv", "br_vh"], backend="cuda")
            return y.view(b, G, dim // G, H, W).sum(1)

    model = Block().cuda()
    x = torch.randn(2, dim // G, H, W, device="cuda", requires_grad=True)
    assert_compiled_matches_eager(model, x, [x])


@pytest.mark.parametrize("H,W", SHAPES + [(33, 9), (64, 31), (65, 700)])
def test_wavefront_shapes(H, W):
    """The wavefront kernels against the reference on every test shape (one, several and a partial band of 32
    rows, chunks of a band cut anywhere), 8 and 16 states."""
    G, tuning = 4, wavefront()
    for N in (8, 16) if H * W < 20000 else (16,):
        assert cuda_build.uses_wave(1, 8, H, W, G, N, tuning)
        inputs = make_inputs(2 if H * W < 10000 else 1, 8, H, W, G, N, z=(H + W + N) % 2 == 0)
        check_against_reference(inputs, group_directions(G, offset=H % 8 + N), tuning=tuning)


@pytest.mark.parametrize("states_per_lane", cuda_build.WAVE_LANE_STATES)
@pytest.mark.parametrize("N", [1, 3, 4, 16, 23])
def test_wavefront_states(states_per_lane, N):
    """Every instantiated states-per-lane count, with N not a multiple of it (idle states in the last warp) and up
    to the largest N whose tiles fit (at most eight warps a block). Larger N take the per-band kernels."""
    tuning = wavefront(states_per_lane)
    assert cuda_build.uses_wave(1, 4, 40, 45, 2, N, tuning) and not cuda_build.uses_wave(1, 4, 40, 45, 2, 64, tuning)
    cfg = cuda_build.wave_config(N, tuning)
    assert cfg.warps <= cuda_build.MAX_THREADS // 32 and cfg.warps * cfg.states_per_lane >= N
    inputs = make_inputs(1, 4, 40, 45, 2, N, z=N % 2 == 0)
    check_against_reference(inputs, ["tr_vh", "bl_hv"], tuning=tuning)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_fp32", [False, True])
@pytest.mark.parametrize("z", [False, True])
def test_wavefront_low_precision(dtype, out_fp32, z):
    inputs = make_inputs(2, 8, 37, 70, 4, 16, dtype=dtype, z=z)
    check_against_reference(inputs, ["tl_hv", "tl_vh", "br_hv", "br_vh"],
                            out_dtype=torch.float32 if out_fp32 else None, tuning=wavefront())


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_wavefront_directions_non_contiguous(direction):
    """Every direction on inputs of every layout: u channels-last, delta a strided slice, B column-major, C shared
    across the batch (stride 0)."""
    b, dim, H, W, G, N = 2, 4, 60, 90, 1, 16
    base = make_inputs(b, dim, H, W, G, N)
    inputs = dict(base)
    inputs["u"] = channels_last_view(base["u"])
    inputs["delta"] = strided_columns(base["delta"])
    inputs["B"] = base["B"].transpose(-1, -2).contiguous().transpose(-1, -2)
    inputs["C"] = base["C"][:1].expand(b, G, N, H, W)
    assert cuda_build.uses_wave(b, dim, H, W, G, N)  # the default rule: many states, few maps
    check_against_reference(inputs, direction)


def test_wavefront_deterministic_and_inference():
    """Bitwise-equal outputs and gradients over repeated runs, and the same y under torch.no_grad."""
    inputs = make_inputs(1, 32, 70, 90, 1, 16)
    dy = torch.randn(1, 32, 70, 90, device="cuda")
    tuning = wavefront()
    first_y, first, _ = run(inputs, "cuda", dy=dy, direction="br_hv", tuning=tuning)
    for _ in range(3):
        y, grads, _ = run(inputs, "cuda", dy=dy, direction="br_hv", tuning=tuning)
        assert torch.equal(y, first_y)
        for name, g in grads.items():
            assert torch.equal(g, first[name]), f"d{name} differs between runs"
    with torch.no_grad():
        y_inf, _, _ = run(inputs, "cuda", direction="br_hv", grad=False, tuning=tuning)
    assert torch.equal(y_inf, first_y)


@pytest.mark.parametrize("H,W,N,dtype", [(14, 14, 1, torch.float32), (5, 300, 16, torch.float32),
                                         (29, 28, 4, torch.bfloat16)])
def test_calls_without_gradients_match_training_forward(H, W, N, dtype):
    """A call that needs no gradient (torch.no_grad, or no input requiring one) skips the autograd.Function and runs
    the launcher directly: bit for bit the training call's y, also for a state split (5 x 300, 16 states: partial
    outputs summed and the z gate applied by the launcher)."""
    inputs = make_inputs(2, 16, H, W, 2, N, dtype=dtype, z=True)
    if N == 16:
        assert cuda_build.launch_config(2, 16, H, W, 2, N).parts > 1 and not cuda_build.uses_wave(2, 16, H, W, 2, N)
    directions = group_directions(2, offset=N)
    y_train, _, _ = run(inputs, "cuda", direction=directions)
    with torch.no_grad():
        y_no_grad, _, _ = run(inputs, "cuda", direction=directions, grad=False)
    y_plain, _, _ = run(inputs, "cuda", direction=directions, grad=False)  # grad mode on, no leaf requires grad
    assert not y_plain.requires_grad and y_train.requires_grad
    assert torch.equal(y_no_grad, y_train.detach()) and torch.equal(y_plain, y_train.detach())


def test_wavefront_256_channels_share_B_C():
    """G = 1: dB and dC summed over 256 channels' tiles (and over a batch of two), gathered into place."""
    inputs = make_inputs(2, 256, 40, 45, 1, 16, z=True)
    check_against_reference(inputs, "br_vh", tuning=wavefront())


def _device_arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


@pytest.mark.parametrize("H,W", [(5, 7), (33, 9), (37, 70), (130, 33), (200, 300)])
def test_wavefront_clusters(H, W):
    """sm_90: the backward's blocks of consecutive channels of a group form a cluster that adds their dB/dC tiles in
    shared memory. Two groups of 16 channels (several clusters each, added by the launcher), a batch of two, every
    gradient; also N = 3 (a cluster's share of a tile cuts through a state)."""
    dim, G, tuning = 32, 2, wavefront()
    assert cuda_build.wave_cluster(dim, G, _device_arch(), tuning) == (
        tuning.wave_cluster if _device_arch() >= 90 else 1)
    for N in (3, 16) if H * W < 10000 else (16,):
        inputs = make_inputs(2 if H * W < 10000 else 1, dim, H, W, G, N, z=(H + N) % 2 == 1)
        check_against_reference(inputs, group_directions(G, offset=H % 8 + N), tuning=tuning)


@pytest.mark.parametrize("states_per_lane", cuda_build.WAVE_LANE_STATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wavefront_clusters_states_and_dtypes(states_per_lane, dtype):
    """Clusters with every states-per-lane count (N = 23: idle states in the last warp) and every input dtype, in
    one group of 24 channels."""
    inputs = make_inputs(1, 24, 40, 45, 1, 23, dtype=dtype, z=True)
    check_against_reference(inputs, "tr_vh", tuning=wavefront(states_per_lane))


@pytest.mark.parametrize("H", [70, 20])
def test_wavefront_backward_without_saved_band_tops(H):
    """A backward whose forward kept nothing (torch.compile's custom op without grad, say) recomputes the band tops:
    the same gradients, bit for bit, as from the forward's (none exist for one band, H <= 32)."""
    b, dim, W, G, N = 1, 4, 50, 2, 16
    launch = dict(tuning=wavefront(), poison=True)
    inputs = make_inputs(b, dim, H, W, G, N)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    directions = (cuda_build.direction_code("tr_hv"), cuda_build.direction_code("bl_vh"))
    dy = torch.randn(b, dim, H, W, device="cuda")
    _, tops, ckh = cuda_scan.fwd_impl(*args, True, directions, True, True, **launch)
    assert ckh is None and (tops is None) == (H <= 32)
    saved = cuda_scan.bwd_impl(dy, *args, tops, None, True, directions, **launch)
    rebuilt = cuda_scan.bwd_impl(dy, *args, None, None, True, directions, **launch)
    for name, g, g2 in zip(GRAD_NAMES, saved, rebuilt):
        assert torch.equal(g, g2), f"d{name} differs"


@pytest.mark.parametrize("tuning", [DEFAULT_TUNING, wavefront()], ids=["band", "wave"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,W,N", [(14, 14, 1), (37, 70, 1), (1, 33, 1), (20, 30, 4)])
def test_backward_shared_outputs(tuning, dtype, H, W, N):
    """The eager backward's outputs that share storage (dB with dC, and with one state dA with dD and
    d(delta_bias), each group reduced in one launch) equal the separate ones a custom op returns, which share
    none; the grouping really happens (a test of the launch count's saving, not of a no-op)."""
    b, dim, G = 2, 16, 4
    assert cuda_build.uses_wave(b, dim, H, W, G, N, tuning) == (tuning is not DEFAULT_TUNING)
    launch = dict(tuning=tuning, poison=True)
    inputs = make_inputs(b, dim, H, W, G, N, dtype=dtype, z=False)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    directions = tuple(cuda_build.direction_code(name) for name in group_directions(G))
    dy = torch.randn(b, dim, H, W, device="cuda").to(dtype)
    separate = cuda_scan.bwd_impl(dy, *args, None, None, True, directions, **launch)
    shared = cuda_scan.bwd_impl(dy, *args, None, None, True, directions, shared_outputs=True, **launch)
    for name, g, g2 in zip(GRAD_NAMES, separate, shared):
        if g is not None:
            assert g2.dtype == g.dtype and g2.shape == g.shape, name
            torch.testing.assert_close(g2, g, rtol=1e-6, atol=1e-6, msg=f"d{name}")
    storages = {name: g.untyped_storage().data_ptr() for name, g in zip(GRAD_NAMES, separate) if g is not None}
    assert len(set(storages.values())) == len(storages)  # a custom op's outputs may not share storage
    _, _, dA, dB, dC, dD, _, dbias = shared
    assert dB.untyped_storage().data_ptr() == dC.untyped_storage().data_ptr()
    same = {t.untyped_storage().data_ptr() for t in (dA, dD, dbias)}
    assert len(same) == (1 if N == 1 else 3)


@pytest.mark.parametrize("tuning", [DEFAULT_TUNING, wavefront(), ScanTuning(split_target_blocks=10**9)],
                         ids=["band", "wave", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,W,N,z", [(56, 56, 1, False), (37, 70, 16, True), (1, 33, 2, False), (14, 14, 4, True)])
@pytest.mark.parametrize("blocks", [1, 2])
def test_groups_share_u(tuning, dtype, H, W, N, z, blocks):
    """u of blocks * dim / G channels read by the G = 4 groups, group g reading block g % blocks (one block: the
    2D mixer's routes; two: the 1D cross-scan's row-major and column-major copies): against the reference, and
    bitwise equal to the same kernels on u tiled to one map per channel, whose du summed over the groups of each
    block is the shared u's."""
    G, per_group = 4, 6
    inputs = make_inputs(1, G * per_group, H, W, G, N, dtype=dtype, z=z)
    inputs["u"] = inputs["u"][:, :blocks * per_group].contiguous()
    directions = group_directions(G)
    check_against_reference(inputs, directions, tuning=tuning)
    y, grads, dy = run(inputs, "cuda", direction=directions, tuning=tuning)
    tiled = {**inputs, "u": inputs["u"].repeat(1, G // blocks, 1, 1)}
    y_tiled, grads_tiled, _ = run(tiled, "cuda", dy=dy, direction=directions, tuning=tuning)
    grads_tiled["u"] = grads_tiled["u"].unflatten(1, (G // blocks, blocks * per_group)).sum(dim=1)
    assert torch.equal(y, y_tiled)
    for name, g in grads.items():
        assert torch.equal(g, grads_tiled[name]), f"d{name} differs from the tiled u's"


@pytest.mark.parametrize("tuning", [DEFAULT_TUNING, wavefront(), ScanTuning(split_target_blocks=10**9)],
                         ids=["band", "wave", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,W,N,z,blocks", [(56, 56, 1, False, 1), (37, 70, 16, True, 0), (1, 33, 2, False, 2),
                                            (14, 14, 4, True, 1), (9, 300, 1, False, 1), (1, 70, 1, False, 2),
                                            (20, 28, 2, True, 2)])
def test_sum_groups(tuning, dtype, H, W, N, z, blocks):
    """y summed over G = 4 groups in the op (the 2D mixer's route sum), or over the groups of each block of a u
    that holds `blocks` of them (0: one map per channel): against the reference, y bitwise equal to the groups'
    outputs summed after the call, and every gradient bitwise equal to the kernels' on the gradient copied to
    every group (the backward reads the one map per channel of a block's group for all its groups). Asked for
    channels_last, y is so laid out with the same values, and a channels_last gradient gives the same gradients."""
    G, per_group = 4, 6
    summed = max(blocks, 1) * per_group
    inputs = make_inputs(1, G * per_group, H, W, G, N, dtype=dtype, z=z)
    if blocks:
        inputs["u"] = inputs["u"][:, :summed].contiguous()
    directions = group_directions(G)
    check_against_reference(inputs, directions, tuning=tuning, sum_groups=True)
    y, grads, dy = run(inputs, "cuda", direction=directions, tuning=tuning, sum_groups=True)
    assert y.shape == (1, summed, H, W)
    copies = G * per_group // summed
    y_full, grads_full, _ = run(inputs, "cuda", dy=dy.repeat(1, copies, 1, 1), direction=directions, tuning=tuning)
    assert torch.equal(y, y_full.unflatten(1, (copies, summed)).sum(dim=1))
    for name, g in grads.items():
        assert torch.equal(g, grads_full[name]), f"d{name} differs from the kernels' on the copied gradient"
    y_cl, grads_cl, _ = run(inputs, "cuda", dy=dy.contiguous(memory_format=torch.channels_last),
                            direction=directions, tuning=tuning, sum_groups=True, channels_last=True)
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(y_cl, y)
    for name, g in grads.items():
        assert torch.equal(grads_cl[name], g), f"d{name} differs with channels_last"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sum_groups_under_autocast_keeps_the_autocast_dtype(dtype):
    """Under CUDA autocast y summed over the groups has the autocast dtype, as the contract and the custom op's fake
    give it, and equals the groups' outputs summed in that dtype (CUDA autocast runs a `sum` without a dtype in
    float32: the 2D mixer's route sum, and all that follows it, would be float32). Gradients reach the float32
    inputs in float32."""
    G, per_group = 4, 8
    inputs = make_inputs(2, G * per_group, 14, 14, G, 1, z=False)  # float32: autocast casts them
    inputs["u"] = inputs["u"][:, :per_group].contiguous()
    directions = group_directions(G)
    with torch.autocast("cuda", dtype=dtype):
        y, grads, _ = run(inputs, "cuda", direction=directions, sum_groups=True)
    assert y.dtype == dtype and y.shape == (2, per_group, 14, 14)
    assert all(g.dtype == torch.float32 for g in grads.values())
    low = {k: (v.to(dtype) if k in ("u", "delta", "B", "C") and v is not None else v) for k, v in inputs.items()}
    y_full, _, _ = run(low, "cuda", direction=directions, grad=False)
    assert torch.equal(y, y_full.unflatten(1, (G, per_group)).sum(dim=1))


def low_rank_inputs(batch, G, per_group, R, H, W, N, dtype, shared_u=True, z=False):
    """Scan inputs with a low-rank delta (batch, G, R, H, W), a strided view as SS2D's x_dbl gives it, and its
    float32 projection `delta_proj` (G, dim / G, R)."""
    inputs = make_inputs(batch, G * per_group, H, W, G, N, dtype=dtype, z=z)
    gen = torch.Generator(device="cpu").manual_seed(next(_seed))
    inputs["delta"] = (torch.randn(G, R, batch, H, W, generator=gen) - 0.5).to("cuda", dtype).permute(2, 0, 1, 3, 4)
    inputs["delta_proj"] = (torch.randn(G, per_group, R, generator=gen) * R**-0.5).cuda()
    if shared_u:
        inputs["u"] = inputs["u"][:, :per_group].contiguous()
    return inputs


def run_low_rank(inputs, directions, dy=None, explicit=False, tuning=DEFAULT_TUNING):
    """y and every input's gradient of the CUDA op on a low-rank delta: through `delta_proj`, or (`explicit`) on
    the full delta expanded before the call by the same product under autograd (what SS2D did before)."""
    leaves = {n: (t.detach().requires_grad_() if t is not None else None) for n, t in inputs.items()}
    args = dict(leaves)
    if explicit:
        args["delta"] = contract.full_delta(args["delta"], args.pop("delta_proj"))
    y = selective_scan_2d_cuda(**args, direction=directions, tuning=tuning, poison_outputs=True)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator(device="cpu").manual_seed(next(_seed))).to(y)
    y.backward(dy)
    return y, {n: t.grad for n, t in leaves.items() if t is not None}, dy


@pytest.mark.parametrize("tuning", [DEFAULT_TUNING, ScanTuning(split_target_blocks=10**9)], ids=["band", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shared_u", [False, True], ids=["u", "shared_u"])
@pytest.mark.parametrize("H,W,N,R", [(56, 56, 1, 6), (14, 14, 1, 24), (1, 33, 2, 3), (37, 70, 4, 2)])
def test_low_rank_delta_matches_explicit_delta(tuning, dtype, shared_u, H, W, N, R, monkeypatch):
    """The op on a low-rank delta (`delta_proj`) against the same op on the full delta expanded by the same product
    before the call: y equal, every gradient equal or (delta_proj's: float32 sums over the images here, the
    autograd of the expanded weight in delta's dtype there) close; and within the usual bound of the float64
    reference (float32 products without TF32)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    G, per_group = 4, 6
    inputs = low_rank_inputs(2, G, per_group, R, H, W, N, dtype, shared_u, z=N == 2)
    directions = group_directions(G)
    y, grads, dy = run_low_rank(inputs, directions, tuning=tuning)
    y_full, grads_full, _ = run_low_rank(inputs, directions, dy=dy, explicit=True, tuning=tuning)
    assert torch.equal(y, y_full)
    for name, g in grads.items():
        assert g.shape == inputs[name].shape and g.dtype == inputs[name].dtype, name
        if name == "delta_proj":
            assert rel_err(g, grads_full[name]) <= (1e-6 if dtype == torch.float32 else 1e-2), name
        else:
            assert torch.equal(g, grads_full[name]), f"d{name} differs from the explicit delta's"
    y_ref, grads_ref, _ = run_low_rank_reference(inputs, directions, dy)
    errors = {"y": rel_err(y, y_ref), **{"d" + n: rel_err(grads[n], g) for n, g in grads_ref.items()}}
    assert all(e <= BOUND[dtype] for e in errors.values()), errors


def run_low_rank_reference(inputs, directions, dy):
    leaves = {n: (t.detach().double().requires_grad_() if t is not None else None) for n, t in inputs.items()}
    y = selective_scan_2d(**leaves, direction=directions, backend="reference")
    y.backward(dy.double())
    return y, {n: t.grad for n, t in leaves.items() if t is not None}, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_rank_delta_keeps_no_full_delta(dtype):
    """What the eager op keeps for its backward (storages, counted once): on a low-rank delta, the same as on the
    full delta except that delta itself gives way to the low-rank delta's storage and the weight."""
    inputs = low_rank_inputs(2, 4, 24, 6, 56, 56, 1, dtype, shared_u=True)

    def kept(leaves):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            selective_scan_2d_cuda(**leaves, direction=group_directions(4))
        return storages

    leaves = {n: (t.detach().requires_grad_() if t is not None else None) for n, t in inputs.items()}
    low_rank = kept(leaves)
    full_delta = contract.full_delta(inputs["delta"], inputs["delta_proj"]).requires_grad_()
    full = kept({**leaves, "delta": full_delta, "delta_proj": None})
    assert full_delta.untyped_storage().data_ptr() in full
    factors = inputs["delta"].untyped_storage().nbytes() + inputs["delta_proj"].untyped_storage().nbytes()
    assert sum(full.values()) - sum(low_rank.values()) == full_delta.untyped_storage().nbytes() - factors
    # rank 6 of 24 channels per group: the low-rank delta is a quarter of the full one
    assert full_delta.untyped_storage().nbytes() == 2 * 4 * 24 * 56 * 56 * dtype.itemsize
    assert full_delta.untyped_storage().nbytes() == 4 * inputs["delta"].untyped_storage().nbytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_rank_delta_under_autocast(dtype):
    """Under CUDA autocast the low-rank delta is expanded in the autocast dtype, as SS2D's matmul under autocast
    did: y equal to the op on that product, gradients flow back to the float32 leaves."""
    inputs = low_rank_inputs(2, 4, 6, 3, 24, 40, 2, torch.float32, shared_u=True)
    directions = group_directions(4)
    leaves = {n: (t.detach().requires_grad_() if t is not None else None) for n, t in inputs.items()}
    with torch.autocast("cuda", dtype=dtype):
        y = selective_scan_2d(**leaves, direction=directions, backend="cuda")
        dt_weights = leaves["delta_proj"].expand(2, -1, -1, -1).flatten(0, 1)
        delta = torch.bmm(dt_weights, leaves["delta"].flatten(3).flatten(0, 1)).view(2, 24, 24, 40)
        y_old = selective_scan_2d(**{**leaves, "delta": delta, "delta_proj": None}, direction=directions,
                                  backend="cuda")
    assert y.dtype == dtype and torch.equal(y, y_old)
    y.float().square().sum().backward()
    assert all(leaves[n].grad is not None and leaves[n].grad.dtype == torch.float32
               for n in ("u", "delta", "delta_proj", "B", "C"))


def test_opcheck_low_rank_delta():
    inputs = low_rank_inputs(1, 2, 4, 3, 5, 20, 2, torch.float32, shared_u=True, z=True)
    args = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
            inputs["delta_bias"], True, [0, 5], False, True, inputs["delta_proj"])
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.mamba2d.scan2d_fwd.default, leaves)
    y, ckv, ckh = torch.ops.mamba2d.scan2d_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    bargs = (torch.randn_like(y), *[a.detach() for a in args[:8]], ckv, ckh, True, [0, 5], args[12].detach())
    torch.library.opcheck(torch.ops.mamba2d.scan2d_bwd.default, bargs)


def test_torch_compile_fullgraph_low_rank_delta():
    """A module that hands the scan a low-rank delta and its projection traces as one graph; compiled and eager
    agree, the projection's gradient too."""
    torch._dynamo.reset()
    dim, G, N, R, H, W = 16, 4, 2, 2, 12, 12

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dbc = torch.nn.Conv2d(dim // G, G * (R + 2 * N), 1)
            self.dt_proj = torch.nn.Parameter(torch.randn(G, dim // G, R) * 0.5)
            self.A_log = torch.nn.Parameter(torch.zeros(dim, N))
            self.D = torch.nn.Parameter(torch.ones(dim))

        def forward(self, x):
            b = x.shape[0]
            dts, B, C = self.dbc(x).view(b, G, R + 2 * N, H, W).split([R, N, N], dim=2)
            y = selective_scan_2d(x, dts, -torch.exp(self.A_log), B, C, self.D, delta_proj=self.dt_proj,
                                  direction=["tl_hv", "tl_vh", "br_hv", "br_vh"], backend="cuda")
            return y.view(b, G, dim // G, H, W).sum(1)

    model = Block().cuda()
    x = torch.randn(2, dim // G, H, W, device="cuda", requires_grad=True)
    assert_compiled_matches_eager(model, x, [x, model.dt_proj])


@pytest.mark.parametrize("tuning", [DEFAULT_TUNING, wavefront()], ids=["band", "wave"])
def test_directions_beyond_packed_codes(tuning):
    """22 groups whose directions do not repeat within 21 groups (more than the parameter struct packs by value)
    reach the kernels as a device tensor of codes, and every group still scans in its own direction."""
    G = 22
    names = [DIRECTIONS[(g * g + g // 3) % 8] for g in range(21)] + ["tl_vh"]  # the first 21 repeat no shorter
    codes = [cuda_build.direction_code(n) for n in names]
    assert cuda_scan.direction_fields(codes, torch.device("cuda"))["dirs"] is not None
    check_against_reference(make_inputs(1, 2 * G, 9, 11, G, 2), names, tuning=tuning)


@pytest.mark.parametrize("H,W,G,N", [(13, 10, 4, 1), (64, 80, 1, 16)], ids=["band", "wave"])
def test_reduce_overhead_compile_replays_eager(H, W, G, N):
    """torch.compile(mode="reduce-overhead") captures the scan in CUDA graphs (the launch reads no tensor cached by
    the op, which the graphs' memory pool forbids) and its replays give the eager output and gradients on fresh
    inputs copied in, step after step."""
    torch._dynamo.reset()
    dim = 8 if G > 1 else 16
    directions = group_directions(G, offset=5)
    assert cuda_build.uses_wave(1, dim, H, W, G, N) == (N == 16)

    def scan(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_2d(u, delta, A, B, C, D, z, delta_bias, direction=directions, backend="cuda")

    compiled = torch.compile(scan, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, capture, replays
        inputs = make_inputs(1, dim, H, W, G, N)
        dy = torch.randn(1, dim, H, W, device="cuda")
        results = []
        for fn in (scan, compiled):
            torch.compiler.cudagraph_mark_step_begin()
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
            y = fn(**leaves)
            y.backward(dy)
            results.append([y.detach().clone()] + [leaves[n].grad.clone() for n in GRAD_NAMES])
        for got, want in zip(*reversed(results)):
            assert rel_err(got, want) <= 1e-6
