"""CPU checks of what the CUDA scan's launches are made of: the tuning value and its parsing by the benchmarks, the
kernels' parameter structs (C layout against the ctypes mirrors), the guards of the private CuPy/PyTorch APIs, and
that the library reads no environment variable."""

from __future__ import annotations

import ctypes
import dataclasses
import re
import shutil
import struct
import subprocess
import types
from pathlib import Path

import pytest
import torch
from repo_tools import load_tool

from mamba2d.ops import cuda_build, cuda_launch
from mamba2d.ops.contract import ScanShape
from mamba2d.ops.cuda_build import DEFAULT_TUNING, ScanTuning
from mamba2d.ops.cuda_launch import PARAM_STRUCTS, LayerNormParams, ScanParams, make_params

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------------
# Tuning


def test_default_tuning_is_the_library_default():
    assert dataclasses.asdict(DEFAULT_TUNING) == dict(
        rows_per_band=4, max_cols_per_thread=4, row_lanes=32, fwd_min_blocks=3, bwd_max_threads=256,
        fwd_max_threads=128, split_target_blocks=1024, wide_cols_per_thread=4, narrow_pairs=True, tile_warps=1,
        vector_access=True, bwd_min_blocks=None, reduction_buffers=None, narrow_bwd_min_blocks=None, prefetch_rows=None,
        lean_pointers=None, wave_min_states=8, force_wavefront=False, wave_states_per_lane=2, wave_steps=8,
        wave_cluster=2)
    assert DEFAULT_TUNING.defines == () and DEFAULT_TUNING.compile_options == cuda_build.COMPILE_OPTIONS
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_TUNING.force_wavefront = True  # type: ignore[misc]


def test_tuning_reaches_the_plan_and_the_compile_options():
    shape = ScanShape(2, 8, 40, 45, 2, 4)  # few states: per-band by default

    def plan(tuning=DEFAULT_TUNING, backward=False):
        return cuda_build.launch_plan(shape, torch.float32, backward=backward, has_z=True, out_fp32=False,
                                      tuning=tuning)

    assert not plan().wave and plan().source == cuda_build.BAND_SOURCE
    forced = ScanTuning(force_wavefront=True, wave_steps=4)
    assert plan(forced).wave and plan(forced, True).wave and plan(forced).source == cuda_build.WAVE_SOURCE
    assert plan(forced).compile_options == (*cuda_build.COMPILE_OPTIONS, "-DM2D_WAVE_T=4")
    assert plan(forced).wave_cfg.steps == 4 and plan(forced, True).wave_chunks == cuda_build.wave_chunks(40, 45, 4)
    narrow = ScanShape(2, 8, 40, 7, 2, 4)  # one column per thread: R rows per band
    assert cuda_build.launch_plan(narrow, torch.float32, backward=False, has_z=False, out_fp32=False,
                                  tuning=ScanTuning(rows_per_band=2)).band.R == 2
    assert ScanTuning(rows_per_band=2, prefetch_rows=0).defines == ("-DM2D_R=2", "-DM2D_PREFETCH=0")
    big = ScanShape(1, 256, 200, 300, 1, 16)
    assert cuda_build.uses_wave(1, 256, 200, 300, 1, 16)
    never = ScanTuning(wave_min_states=cuda_build.MAX_D_STATE + 1)
    assert not cuda_build.launch_plan(big, torch.float32, backward=False, has_z=False, out_fp32=False,
                                      tuning=never).wave
    split = cuda_build.launch_plan(big, torch.float32, backward=False, has_z=True, out_fp32=False, tuning=never)
    assert split.split and split.out_fp32 and not split.gate_in_kernel  # float32 partial y, gated by the launcher
    assert not cuda_build.launch_plan(big, torch.float32, backward=False, has_z=True, out_fp32=False,
                                      tuning=dataclasses.replace(never, split_target_blocks=0)).split


def test_benchmark_tuning_parses_the_environment_spec():
    tool = load_tool("scan_tuning")
    assert tool.from_env({}) == DEFAULT_TUNING and tool.from_env({tool.ENV: ""}) == DEFAULT_TUNING
    tuning = tool.from_env({tool.ENV: "R=2,FWD=4,BWD=2,KMAX=2,LANES=16,BTHR=128,FTHR=256,SPLIT=0,WIDEK=1,PAIRS=0,"
                                      "VEC=0,DBUF=0,BWDN=4,PF=4,LEAN=0,WNS=4,WT=4,WCL=1,TW=2"})
    assert tuning == ScanTuning(
        rows_per_band=2, fwd_min_blocks=4, bwd_min_blocks=2, max_cols_per_thread=2, row_lanes=16,
        bwd_max_threads=128, fwd_max_threads=256, split_target_blocks=0, wide_cols_per_thread=1, narrow_pairs=False,
        vector_access=False, reduction_buffers=0, narrow_bwd_min_blocks=4, prefetch_rows=4, lean_pointers=0,
        wave_states_per_lane=4, wave_steps=4, wave_cluster=1, tile_warps=2)
    assert tuning.defines == ("-DM2D_R=2", "-DM2D_BWD_MIN_BLOCKS=2", "-DM2D_RED_DBUF=0",
                              "-DM2D_NARROW_BWD_MIN_BLOCKS=4", "-DM2D_PREFETCH=4", "-DM2D_LEAN=0", "-DM2D_WAVE_T=4")
    assert tool.parse("WAVE=1").force_wavefront
    assert tool.parse("WAVE=0").wave_min_states == cuda_build.MAX_D_STATE + 1
    assert tool.parse("PAIRS=1,VEC=1") == DEFAULT_TUNING


def test_benchmark_models_use_the_environment_tuning_only_where_set():
    from mamba2d.models import vmamba

    tool = load_tool("scan_tuning")
    public = vmamba.selective_scan_2d
    with tool.models_use_env({}):
        assert vmamba.selective_scan_2d is public
    with tool.models_use_env({tool.ENV: "TW=8"}):
        assert vmamba.selective_scan_2d is not public
    assert vmamba.selective_scan_2d is public


@pytest.mark.parametrize("spec,message", [
    ("RR=4", r"unknown key 'RR'; known keys: R, KMAX"),
    ("R=four", r"R must be an integer, got 'four'"),
    ("R", r"item 'R' is not KEY=VALUE"),
    ("WAVE=2", r"WAVE must be 0 .* or 1 .*, got '2'"),
])
def test_benchmark_tuning_names_bad_specs(spec, message):
    tool = load_tool("scan_tuning")
    with pytest.raises(ValueError, match=rf"^MAMBA2D_SCAN_TUNE: {message}"):
        tool.from_env({tool.ENV: spec})


def test_benchmark_scan_keeps_the_public_signature_and_falls_back_off_gpu():
    """tools/scan_tuning.scan(tuning) stands in for selective_scan_2d in the benchmarks: same call, the reference for
    CPU tensors or backend="reference" (the tuning only reaches the CUDA kernels)."""
    from mamba2d.ops import selective_scan_2d_ref

    tool = load_tool("scan_tuning")
    scan = tool.scan(ScanTuning(force_wavefront=True))
    u = torch.randn(1, 4, 5, 6)
    B = torch.randn(1, 2, 3, 5, 6)
    args = (u, u.clone(), -torch.rand(4, 3), B, B.clone())
    expected = selective_scan_2d_ref(*args, direction=["tl_hv", "br_vh"])
    assert torch.equal(scan(*args, direction=["tl_hv", "br_vh"]), expected)
    assert torch.equal(scan(*args, direction=["tl_hv", "br_vh"], backend="reference"), expected)
    assert scan.__name__ == "selective_scan_2d"


def test_the_library_reads_no_environment_variable():
    """Tuning is a value passed down; only tools/ read MAMBA2D_SCAN_TUNE."""
    for path in sorted((REPO / "src" / "mamba2d" / "ops").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"\benviron\b|\bgetenv\b", text), path.name


# ----------------------------------------------------------------------------------------------------------------
# Parameter structs


def _c_fields(struct_name: str) -> list[str]:
    """Field names of `struct_name` in cuda_ops/scan2d_params.cuh, in declaration order."""
    text = (cuda_build.kernel_dir() / cuda_build.PARAMS_HEADER).read_text()
    text = re.sub(r"//[^\n]*", "", text)
    body = re.search(rf"struct\s+{struct_name}\s*{{(.*?)}};", text, re.DOTALL)
    assert body, f"struct {struct_name} not found in {cuda_build.PARAMS_HEADER}"
    names = []
    for declaration in body.group(1).split(";"):
        for declarator in declaration.split(","):
            if declarator.strip():
                names.append(re.findall(r"[A-Za-z_]\w*", declarator)[-1])
    return names


def _host_compiler() -> list[str] | None:
    if shutil.which("g++"):
        return ["g++", "-std=c++17", "-x", "c++"]
    if shutil.which("nvcc"):
        return ["nvcc", "-std=c++17", "-x", "cu"]
    return None


@pytest.mark.skipif(_host_compiler() is None, reason="needs g++ or nvcc")
def test_ctypes_structs_match_the_c_layout(tmp_path):
    """Every field of each parameter struct: the same names in the same order in C and in ctypes, and the same
    offset and size as a compiler lays them out, and the same total size (a kernel reads its parameters at these
    offsets)."""
    lines = ["#include <cstddef>", "#include <cstdio>", f'#include "{cuda_build.PARAMS_HEADER}"', "int main() {"]
    for c_name, mirror in PARAM_STRUCTS.items():
        assert _c_fields(c_name) == [name for name, _ in mirror._fields_], c_name
        lines.append(f'    std::printf("{c_name} sizeof %zu %zu\\n", sizeof({c_name}), alignof({c_name}));')
        for name, _ in mirror._fields_:
            lines.append(f'    std::printf("{c_name} {name} %zu %zu\\n", offsetof({c_name}, {name}), '
                         f"sizeof((({c_name}*)nullptr)->{name}));")
    lines += ["    return 0;", "}"]
    source = tmp_path / "layout.cpp"
    source.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    proc = subprocess.run([*_host_compiler(), str(source), "-I", str(cuda_build.kernel_dir()), "-o", str(exe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = {}
    for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines():
        struct_name, field, offset, size = line.split()
        printed[struct_name, field] = (int(offset), int(size))
    for c_name, mirror in PARAM_STRUCTS.items():
        assert printed[c_name, "sizeof"] == (ctypes.sizeof(mirror), ctypes.alignment(mirror)), c_name
        assert ctypes.sizeof(mirror) < 4096  # kernel parameters by value
        for name, ctype in mirror._fields_:
            assert printed[c_name, name] == (getattr(mirror, name).offset, ctypes.sizeof(ctype)), f"{c_name}.{name}"
        # what make_params packs with: the same offsets (struct adds no trailing padding)
        codes = cuda_launch.struct_layout(mirror).format.lstrip("@")
        offsets = [struct.calcsize("@" + codes[: i + 1]) - struct.calcsize(code) for i, code in enumerate(codes)]
        assert offsets == [getattr(mirror, name).offset for name, _ in mirror._fields_], c_name


def test_make_params_fills_fields_by_name():
    t = torch.zeros(2, 3, 4, 5)[:, :, 1:, ::2]
    params = make_params(ScanParams, u=t, z=None, dim=7, su_b=2**40, nmaps=-3,
                         **cuda_launch.stride_fields(("sd", t, "bdhw"), ("sB", None, "bgnhw")))
    assert params.u == t.data_ptr() and params.z is None and params.delta is None
    assert (params.dim, params.su_b, params.nmaps) == (7, 2**40, -3)
    assert (params.sd_b, params.sd_d, params.sd_h, params.sd_w) == t.stride()
    assert (params.sB_b, params.sB_g, params.sB_n, params.sB_h, params.sB_w) == (0,) * 5
    assert params.H == 0 and params.keep_tops == 0
    norm = make_params(LayerNormParams, rows=5, C=3, eps=0.25)
    assert (norm.rows, norm.C, norm.eps) == (5, 3, 0.25)


def test_make_params_names_bad_fields_and_values():
    with pytest.raises(TypeError, match="ScanParams has no field nonsense"):
        make_params(ScanParams, nonsense=1)
    with pytest.raises(OverflowError, match=r"ScanParams\.H = 2147483648 does not fit its C type c_int"):
        make_params(ScanParams, H=2**31)
    with pytest.raises(OverflowError, match=r"ScanParams\.su_b = 9223372036854775808 does not fit"):
        make_params(ScanParams, su_b=2**63)


# ----------------------------------------------------------------------------------------------------------------
# Private APIs


def test_private_api_guard_names_what_is_missing():
    fake = types.ModuleType("cupy_backends.cuda.api.driver")
    fake.launchKernel = lambda *args: None
    cuda_launch.check_private_api(fake, cuda_launch.CUPY_DRIVER_ATTRS, "cupy", "13.0.0")
    del fake.launchKernel
    with pytest.raises(RuntimeError, match=r"cupy_backends\.cuda\.api\.driver\.launchKernel of cupy, which this "
                                           r"installed version \(13\.0\.0\) does not have"):
        cuda_launch.check_private_api(fake, cuda_launch.CUPY_DRIVER_ATTRS, "cupy", "13.0.0")


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch build has no CUDA stream getter")
def test_installed_torch_has_the_raw_stream_getter():
    cuda_launch.check_private_api(torch._C, (cuda_launch.TORCH_RAW_STREAM_ATTR,), "torch", torch.__version__)


def test_installed_cupy_has_the_driver_bindings():
    pytest.importorskip("cupy")
    from cupy_backends.cuda.api import driver, runtime

    cuda_launch.check_private_api(driver, cuda_launch.CUPY_DRIVER_ATTRS, "cupy", "installed")
    cuda_launch.check_private_api(runtime, cuda_launch.CUPY_RUNTIME_ATTRS, "cupy", "installed")
