"""Throughput tool on CPU with small settings: every mode and precision runs and the table is printed."""

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
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "profile_train_step.py"
    spec = importlib.util.spec_from_file_location("profile_train_step", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    expected = {
        "void mamba2d_scan2d_fwd<float, float, 2, 2, 1, false, 3>(float const*)": "scan forward",
        "void mamba2d_scan2d_bwd<m2d_bf16, m2d_bf16, 4, 1, 0, false>(m2d_bf16 const*)": "scan backward",
        "sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32": "gemm",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>": "layer norm",
        "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float>>": "reduction",
        "void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>": "copy/elementwise",
        "conv2d_c1_k1_nhwc": "convolution",
        "void at::native::GammaBetaBackwardCUDAKernelTemplate<float>": "other",
    }
    assert {name: tool.kernel_group(name) for name in expected} == expected
