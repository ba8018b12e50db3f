"""tools/inspect_sass.py: SASS parsed into instructions, the global loads' waves and the instruction kinds, and (where
nvcc, cuobjdump and nvdisasm are installed: CI has nvcc, the dev extra brings the other two) a scan kernel inspected
end to end, without a GPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from repo_tools import load_tool

tool = load_tool("inspect_sass")

# cuobjdump's layout: a function header, then one instruction per line with its address and encoding.
LISTING = """
        Function : _Z6kernelPKf
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   LD.E R2, desc[UR4][R4.64] ;            /* 0x0000000404027980 */
        /*0020*/                   LD.E.64 R6, desc[UR4][R8.64] ;         /* 0x0000000408067980 */
        /*0030*/                   IMAD R10, R11, R12, RZ ;               /* 0x0000000c0b0a7224 */
        /*0040*/                   FADD R3, R2, R7 ;                      /* 0x0000000702037221 */
        /*0050*/              @!P1 LD.E.U16 R12, desc[UR4][R14.64] ;      /* 0x000000040e0c9980 */
        /*0060*/                   STS [R12], RZ ;                        /* 0x000000ff0c007388 */
        /*0070*/                   LDG.E.128 R16, desc[UR4][R20.64] ;     /* 0x0000000414107981 */
        /*0080*/                   MOV R19, RZ ;                          /* 0x000000ff00137202 */
        /*0090*/                   HADD2.F32 R22, -RZ, R23.H0_H0 ;        /* 0x30000017ff167230 */
        /*00a0*/                   EXIT ;                                 /* 0x000000000000794d */
        ..........
"""


def test_listing_parses_into_instructions():
    functions = tool.parse_sass(LISTING)
    assert list(functions) == ["_Z6kernelPKf"]
    ins = functions["_Z6kernelPKf"]
    assert [i.op for i in ins] == ["LDC", "LD", "LD", "IMAD", "FADD", "LD", "STS", "LDG", "MOV", "HADD2", "EXIT"]
    assert ins[2].mods == ".E.64" and ins[2].args == "R6, desc[UR4][R8.64]"


def test_a_wave_ends_where_a_loaded_register_is_read_or_overwritten():
    """The two loads before FADD form one wave (FADD reads R7, the upper half of the 64-bit load; IMAD reads R12
    before any load writes it), the predicated 16-bit load is read by the shared store, and the 128-bit load's last
    register is overwritten by MOV."""
    assert tool.load_waves(tool.parse_sass(LISTING)["_Z6kernelPKf"]) == [2, 1, 1]


def test_instructions_are_counted_by_kind():
    counts = tool.kind_counts(tool.parse_sass(LISTING)["_Z6kernelPKf"])
    assert counts == {"global load": 4, "constant load": 1, "integer / address": 2, "float math": 1,
                      "shared memory": 1, "16-bit math / conversion": 1, "control": 1}


def test_ptxas_report_gives_registers_and_spills():
    report = ("ptxas info    : Compiling entry function '_Z6kernelPKf' for 'sm_90'\n"
              "ptxas info    : Function properties for _Z6kernelPKf\n"
              "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
              "ptxas info    : Used 78 registers, used 0 barriers\n")
    assert tool.ptxas_usage(report) == {"registers": 78, "spill stores (bytes)": 4, "spill loads (bytes)": 4}


def _disassemblers() -> bool:
    """Whether cuobjdump is found as the tool finds it, with nvdisasm beside it or on PATH."""
    try:
        cuobjdump = Path(tool.find_cuobjdump(None))
    except FileNotFoundError:
        return False
    return (cuobjdump.parent / "nvdisasm").exists() or shutil.which("nvdisasm") is not None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None or not _disassemblers(), reason="needs nvcc, cuobjdump, nvdisasm")
def test_the_shape_b_forward_is_inspected_end_to_end(capsys):
    """The forward kernel that shape b's launch plan names, compiled for sm_90: a report of its registers, kinds and
    load waves, whose loads add up."""
    assert tool.main(["--shape", "b", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("mamba2d_scan2d_fwd<float, float,") and "(sm_90, scan2d_band.cu)" in out[0]
    assert any(line.strip().startswith("registers: ") for line in out)
    waves = next(line for line in out if "global-load waves" in line)
    loads = next(int(line.split(":")[1]) for line in out if line.strip().startswith("global load:"))
    assert f", {loads} loads)" in waves
