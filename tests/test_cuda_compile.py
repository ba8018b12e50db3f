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
def test_kernels_compile_with_nvcc(arch, tmp_path):
    source = tmp_path / "scan2d_all_variants.cu"
    source.write_text(cuda_build.nvcc_translation_unit())
    cmd = [NVCC, *cuda_build.COMPILE_OPTIONS, f"-arch={arch}", "-c", str(source), "-o", str(tmp_path / "k.o"),
           "-Werror", "all-warnings"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"nvcc failed for {arch}:\n{proc.stdout}\n{proc.stderr}"


def test_source_is_self_contained():
    """NVRTC gets one text: local includes are spliced in and no system header is needed."""
    text = cuda_build.kernel_source()
    assert not re.search(r"^\s*#\s*include", text, re.MULTILINE)
    assert "mamba2d_scan2d_fwd" in text and "mamba2d_scan2d_bwd" in text
    assert f"#define M2D_R {cuda_build.ROWS_PER_BAND}" in text
    assert f"#define M2D_MAX_THREADS {cuda_build.MAX_THREADS}" in text
    for name, value in cuda_build.LAYOUTS.items():
        assert f"#define M2D_{name.upper()} {value}" in text
