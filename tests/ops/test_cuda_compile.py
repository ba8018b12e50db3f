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
@pytest.mark.parametrize("unit", ["scan2d", "layer_norm"])
def test_kernels_compile_with_nvcc(arch, unit, tmp_path):
    source = tmp_path / f"{unit}_all_variants.cu"
    text = (cuda_build.nvcc_translation_unit(int(arch[3:])) if unit == "scan2d"
            else cuda_build.nvcc_layer_norm_translation_unit())
    source.write_text(text)
    cmd = [NVCC, *cuda_build.COMPILE_OPTIONS, f"-arch={arch}", "-c", str(source), "-o", str(tmp_path / "k.o"),
           "-Werror", "all-warnings"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"nvcc failed for {arch}:\n{proc.stdout}\n{proc.stderr}"


def test_source_is_self_contained():
    """NVRTC gets one text: local includes are spliced in and no system header is needed."""
    text = cuda_build.kernel_source()
    for source in (text, cuda_build.kernel_source(cuda_build.LAYER_NORM_SOURCE)):
        assert not re.search(r"^\s*#\s*include", source, re.MULTILINE)
    assert "mamba2d_scan2d_fwd" in text and "mamba2d_scan2d_bwd" in text
    assert f"#define M2D_R {cuda_build.ROWS_PER_BAND}" in text
    assert f"#define M2D_MAX_THREADS {cuda_build.MAX_THREADS}" in text
    assert f"#define M2D_NARROW_BWD_MAX_THREADS {cuda_build.NARROW_BWD_MAX_THREADS}" in text
    for name, value in cuda_build.LAYOUTS.items():
        assert f"#define M2D_{name.upper()} {value}" in text
