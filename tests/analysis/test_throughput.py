"""Throughput tool on CPU with small settings: every mode and precision runs and the table is printed; on a GPU,
graphed measurements in a row free each other."""

import gc
import json
import weakref

import pytest
import timm
import torch
from repo_tools import load_tool

import mamba2d  # noqa: F401  (registers the models)
from mamba2d.analysis import throughput
from mamba2d.cli import main


def test_cpu_throughput_table(capsys):
    assert main(["throughput", "--models", "[vmamba2d_nano]", "--batch", "1", "--size", "32", "--device", "cpu",
                 "--warmup", "1", "--iters", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == throughput.HEADER
    rows = lines[2:]
    assert [(r.split()[1], r.split()[2]) for r in rows] == [
        ("inference", "fp32"), ("inference", "fp16"), ("training", "fp32"), ("training", "fp16")]
    for row in rows:
        images_per_s, peak_gb = float(row.split()[5]), float(row.split()[6])
        assert images_per_s > 0 and 0.01 < peak_gb < 100  # GB = 10^9 bytes: a small CPU process
        assert row.endswith("process peak RSS")
    assert "fp32 = float32 (TF32 off)" in lines[0] and "GB = 10^9 bytes" in lines[0]
    assert "images/s = images per second" in lines[0]


def test_bf16_precision_is_selectable(capsys):
    assert main(["throughput", "--models", "[vmamba2d_nano]", "--batch", "1", "--size", "32", "--device", "cpu",
                 "--modes", "[training]", "--precisions", "[bf16]", "--warmup", "1", "--iters", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [(r.split()[1], r.split()[2]) for r in rows] == [("training", "bf16")]


def test_train_step_profile_groups_kernels_by_kind():
    """tools/profile_train_step.py sorts CUDA kernel names into the kinds docs/performance.md reports."""
    tool = load_tool("profile_train_step")
    expected = {
        "void mamba2d_scan2d_fwd<float, float, 2, 2, 1, false, 3>(float const*)": "scan forward",
        "void mamba2d_scan2d_bwd<m2d_bf16, m2d_bf16, 4, 1, 0, false>(m2d_bf16 const*)": "scan backward",
        "sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32": "gemm",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>": "layer norm",
        "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float>>": "reduction",
        "void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>": "copy/elementwise",
        "conv2d_c1_k1_nhwc": "convolution",
        "void mamba2d_layout_swap<unsigned int>(M2DSwapParams)": "layout copy",
        "void mamba2d_silu_both_bwd<m2d_half>(M2DSiluParams)": "SiLU both layouts",
        "void at::native::GammaBetaBackwardCUDAKernelTemplate<float>": "other",
    }
    assert {name: tool.kernel_group(name) for name in expected} == expected


def test_model_benchmark_compares_at_the_same_precision_and_judges_targets():
    """tools/bench_models.py puts ours beside upstream's figure of the same precision only (bf16 stands alone) and
    says whether the speed (at least) and memory (at most) targets are met."""
    tool = load_tool("bench_models")
    m = throughput.Measurement
    fast = tool.row(m("vmamba2d_tiny", "training", "fp32", 128, 224, 1610.0, 18.5, "cuda allocated"), "eager")
    slow = tool.row(m("vmamba2d_tiny", "training", "fp16", 128, 224, 1880.0, 11.6, "cuda allocated"), "eager")
    bf16 = tool.row(m("vmamba2d_tiny", "training", "bf16", 128, 224, 2000.0, 11.0, "cuda allocated"), "eager")
    ckpt = tool.row(m("vmamba2d_tiny", "training", "fp32", 128, 224, 1200.0, 9.0, "cuda allocated"), "eager+ckpt")
    assert fast["ratio"] == 1610.0 / 805.0 and fast["target_ratio"] == 2.0
    assert fast["memory_ratio"] == 18.5 / 23.19 and slow["memory_ratio"] == 11.6 / 14.35
    assert bf16["upstream"] is None and bf16["ratio"] is None
    assert ckpt["memory_ratio"] is None and ckpt["target_ratio"] is None  # checkpointing has its own row, no target
    graphs = tool.row(m("vmamba2d_tiny", "training", "fp16", 128, 224, 2400.0, 9.0, "cuda allocated"), "compiled+graph")
    assert graphs["target_ratio"] == 2.5  # torch.compile's CUDA graphs are judged against the compiled target
    table = tool.markdown([fast, slow, bf16, ckpt], "NVIDIA H100 80GB HBM3").splitlines()
    assert "GB = 10^9 bytes" in table[0] and "NVIDIA H100 80GB HBM3" in table[0]
    assert "2.00x (meets ≥2.0x)" in table[4] and "0.80x (meets ≤0.8x)" in table[4]
    assert "1.99x (misses ≥2.0x)" in table[5] and "0.81x (misses ≤0.8x)" in table[5]
    assert "| — | — |" in table[6]


@pytest.mark.slow
def test_model_benchmark_measures_each_configuration_in_a_process_of_its_own(tmp_path, capfd):
    """tools/bench_models.py runs every (model, variant, mode, precision) in a fresh process and gathers their rows
    in order into one table and one JSON file."""
    out = tmp_path / "rows.json"
    tool = load_tool("bench_models")
    assert tool.main(["--models", "vmamba2d_nano", "--modes", "training", "inference", "--precisions", "fp32",
                      "--batch", "1", "--size", "32", "--warmup", "1", "--iters", "1", "--device", "cpu",
                      "--json", str(out)]) == 0
    printed = capfd.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["mode"], r["precision"]) for r in rows] == [
        ("vmamba2d_nano", "training", "fp32"), ("vmamba2d_nano", "inference", "fp32")]
    # each child printed its measurement and left the table to the parent, which printed it once
    assert printed.count("vmamba2d_nano eager training fp32:") == 1 and printed.count("| model | mode |") == 1
    assert printed.count("| vmamba2d_nano |") == 2


def test_cuda_graph_needs_training_on_cuda():
    """CUDA-graph timing is refused, naming the setting, where it cannot run (CPU, inference)."""
    model = timm.create_model("vmamba2d_nano")
    for mode in ("training", "inference"):
        with pytest.raises(ValueError, match="cuda_graph needs mode 'training' on a CUDA device"):
            throughput.measure(model, "vmamba2d_nano", mode, "fp32", 1, 32, torch.device("cpu"), 0, 1,
                               cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        throughput.throughput(["vmamba2d_nano"], batch=1, size=32, device="cpu", cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_graphed_measurement_frees_the_one_before():
    """Graphed measurements in a row (the model benchmark captures a fresh model per precision): each frees the
    models measured before it, with their graphs and memory pools, before it starts. A graphed model lives in a
    reference cycle (the callables that replace its forward), which only the cyclic collector frees: left to its own
    pace (switched off here, so that the test does not depend on when it runs), the pools piled up until the card ran
    out."""
    device = torch.device("cuda")
    first, second = timm.create_model("vmamba2d_nano"), timm.create_model("vmamba2d_nano")
    first_ref = weakref.ref(first)
    gc.disable()
    try:
        throughput.measure(first, "vmamba2d_nano", "training", "fp32", 8, 64, device, 1, 1, cuda_graph=True)
        del first
        assert first_ref() is not None  # kept by its cycle
        throughput.measure(second, "vmamba2d_nano", "training", "fp32", 8, 64, device, 1, 1, cuda_graph=True)
        assert first_ref() is None
    finally:
        gc.enable()
