"""CI check without a GPU: every kernel variant compiles with nvcc for sm_80 and sm_90, with NVRTC's options."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from mamba2d.ops import cuda_build

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("unit", [*cuda_build.SCAN_SOURCES, cuda_build.LAYER_NORM_SOURCE, cuda_build.LAYOUT_SOURCE])
def test_kernels_compile_with_nvcc(arch, unit, tmp_path):
    """Each kernel source is its own translation unit (as NVRTC compiles it), with every instantiation a launch plan
    may name."""
    source = tmp_path / f"all_variants_{unit}"
    others = {cuda_build.LAYER_NORM_SOURCE: cuda_build.nvcc_layer_norm_translation_unit,
              cuda_build.LAYOUT_SOURCE: cuda_build.nvcc_layout_translation_unit}
    text = (cuda_build.nvcc_translation_unit(unit, int(arch[3:])) if unit in cuda_build.SCAN_SOURCES
            else others[unit]())
    source.write_text(text)
    cmd = [NVCC, *cuda_build.COMPILE_OPTIONS, f"-arch={arch}", "-c", str(source), "-o", str(tmp_path / "k.o"),
           "-Werror", "all-warnings"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"nvcc failed for {arch}:\n{proc.stdout}\n{proc.stderr}"


def test_source_is_self_contained():
    """NVRTC gets one text per source: local includes are spliced in (the parameter structs with the common header)
    and no system header is needed."""
    band, wave = (cuda_build.kernel_source(name) for name in cuda_build.SCAN_SOURCES)
    others = (cuda_build.LAYER_NORM_SOURCE, cuda_build.LAYOUT_SOURCE)
    for source in (band, wave, *map(cuda_build.kernel_source, others)):
        assert not re.search(r"^\s*#\s*include", source, re.MULTILINE)
        assert "struct M2DScanParams {" in source and source.count("typedef long long m2d_i64;") == 1
    assert "mamba2d_scan2d_fwd(" in band and "mamba2d_scan2d_bwd(" in band and "_wave(" not in band
    assert "mamba2d_scan2d_fwd_wave(" in wave and "mamba2d_scan2d_bwd_wave(" in wave
    assert "mamba2d_scan2d_fwd(" not in wave and "mamba2d_scan2d_bwd(" not in wave
    text = band
    assert f"#define M2D_R {cuda_build.ROWS_PER_BAND}" in text
    assert f"#define M2D_MAX_THREADS {cuda_build.MAX_THREADS}" in text
    assert f"#define M2D_NARROW_BWD_MAX_THREADS {cuda_build.NARROW_BWD_MAX_THREADS}" in text
    for name, value in cuda_build.LAYOUTS.items():
        assert f"#define M2D_{name.upper()} {value}" in text
