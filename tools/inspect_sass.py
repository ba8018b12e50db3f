#!/usr/bin/env python
"""What the compiler made of one scan kernel, without a GPU: registers and spills (ptxas), static instructions by
kind, and how the kernel issues its global loads (cuobjdump's SASS).

The kernel is the one a benchmark shape of tools/bench_scan.py launches (its launch plan, as the library makes it),
or any kernel named with --kernel. nvcc compiles it for `--arch` with the options NVRTC would get; cuobjdump
disassembles the cubin. *Load waves* follow the code in static order: a wave is a run of global loads issued before
the first instruction that reads one of their results, which must wait for them. A band's inputs issued in one wave
are in flight together; split into several, each wave's latency is paid in turn (this is how the 16-bit forward at
shape a differs from its faster build of git b588352: docs/performance.md, *What is left*). A static view: branches,
predicates and unrolled copies all count once; Nsight Compute (tools/profile_scan.py --ncu) has the dynamic one.

    python tools/inspect_sass.py --shape a --dtype fp16 [--backward] [--arch 90] [--waves 12]
    python tools/inspect_sass.py --kernel 'mamba2d_scan2d_fwd<float, float, 2, 2, 1, false, 3>' --source scan2d_band.cu

Needs nvcc, and cuobjdump with the nvdisasm it runs: from the CUDA toolkit (on PATH, or --cuobjdump), or the pip
wheels nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm (in the dev extra on Linux; found in their nvidia/cu*/bin).
`MAMBA2D_SCAN_TUNE` (tools/scan_tuning.py) inspects the kernels of other launch parameters.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import scan_tuning  # noqa: E402
from bench_scan import DTYPES, SHAPES  # noqa: E402

from mamba2d.ops import cuda_build  # noqa: E402
from mamba2d.ops.contract import ScanShape  # noqa: E402

#: Kinds of SASS opcodes (first match wins), for the instruction counts.
KINDS = (
    ("global load", r"^(LD|LDG)$"),
    ("global store", r"^(ST|STG|RED|ATOM)$"),
    ("shared memory", r"^(LDS|STS|ATOMS|LDSM)$"),
    ("constant load", r"^(LDC|ULDC)$"),
    ("16-bit math / conversion", r"^(HADD2|HMUL2|HFMA2|F2F|F2FP|PRMT)$"),
    ("float math", r"^(FADD|FMUL|FFMA|FMNMX|FSEL|FSETP|MUFU|FCHK|FSWZADD)$"),
    ("integer / address", r"^(IMAD|IADD3|LEA|LOP3|SHF|SEL|ISETP|IABS|VIADD|VIADDMNMX|IMNMX|I2F|F2I|MOV|UIMAD|UIADD3"
                          r"|UMOV|ULEA|USHF|ULOP3|USEL|UISETP|IMUL|POPC|FLO|PLOP3|S2R|S2UR|CS2R|R2UR)$"),
    ("warp shuffle / vote", r"^(SHFL|VOTE|VOTEU|MATCH)$"),
    ("control", r"^(BRA|BSSY|BSYNC|EXIT|RET|CALL|BAR|WARPSYNC|NOP|YIELD|BPT|MEMBAR|DEPBAR|ERRBAR|CCTL)$"),
)
_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?P<pred>@!?U?P[0-9T]\s+)?(?P<op>[A-Z0-9_]+)(?P<mods>(?:\.[A-Z0-9_]+)*)"
                   r"\s*(?P<args>[^;]*);")
_REG = re.compile(r"\bR(\d+)(?:\.(64|128))?")
_WIDTH = {"64": 2, "128": 4}


class Instruction(NamedTuple):
    """One SASS instruction.

    Args:
        op: The opcode without modifiers (`LD`, `HADD2`, ...).
        mods: The modifiers, dot-joined (`.E.U16`), empty where none.
        args: The operands as written.
    """

    op: str
    mods: str
    args: str


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """The instructions of each function of cuobjdump's `-sass` listing, by mangled name.

    Args:
        text: cuobjdump's output.
    """
    functions: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        head = re.search(r"Function : (\S+)", line)
        if head:
            current = functions.setdefault(head.group(1), [])
            continue
        m = _LINE.search(line)
        if m and current is not None:
            current.append(Instruction(m.group("op"), m.group("mods"), m.group("args").strip()))
    return functions


def _registers(operands: str) -> set[int]:
    """The general registers an operand list names (a `.64` / `.128` one and the registers after it)."""
    out = set()
    for number, width in _REG.findall(operands):
        out.update(range(int(number), int(number) + _WIDTH.get(width, 1)))
    return out


def _loaded(ins: Instruction) -> set[int]:
    """The registers a global load writes (its first operand, widened by a .64 / .128 modifier)."""
    dest = ins.args.split(",", 1)[0]
    width = 4 if ".128" in ins.mods else 2 if ".64" in ins.mods else 1
    return {r + i for r in _registers(dest) for i in range(width)}


def load_waves(instructions: list[Instruction]) -> list[int]:
    """Sizes of the kernel's waves of global loads, in static order: loads issued one after another until an
    instruction reads a register one of them loads (or overwrites it), which ends the wave.

    Args:
        instructions: One function's instructions (`parse_sass`).
    """
    waves, pending, count = [], set(), 0
    loads = re.compile(dict(KINDS)["global load"])
    for ins in instructions:
        if loads.match(ins.op):
            pending |= _loaded(ins)
            count += 1
            continue
        # any operand: a source (read) or the destination (overwritten); a store's are all read
        if count and _registers(ins.args) & pending:
            waves.append(count)
            pending, count = set(), 0
    if count:
        waves.append(count)
    return waves


def kind_counts(instructions: list[Instruction]) -> Counter:
    """Instructions by kind (KINDS; "other" for the rest).

    Args:
        instructions: One function's instructions.
    """
    counts = Counter()
    for ins in instructions:
        counts[next((kind for kind, pattern in KINDS if re.match(pattern, ins.op)), "other")] += 1
    return counts


def find_cuobjdump(given: str | None) -> str:
    """cuobjdump: `given`, else on PATH, else in the nvidia-cuda-cuobjdump wheel of this Python.

    Args:
        given: A path from the command line, or None.

    Raises:
        FileNotFoundError: When none is found.
    """
    if given:
        return given
    found = shutil.which("cuobjdump")
    if found:
        return found
    for bin_dir in sorted(Path(sysconfig.get_paths()["purelib"]).glob("nvidia/cu*/bin")):
        if (bin_dir / "cuobjdump").exists():
            return str(bin_dir / "cuobjdump")
    raise FileNotFoundError("cuobjdump not found: install the CUDA toolkit's or `python -m pip install "
                            "nvidia-cuda-cuobjdump`, or pass --cuobjdump PATH")


def compile_kernel(source: str, kernel: str, arch: int, options: tuple[str, ...], workdir: Path,
                   cuobjdump: str) -> tuple[str, str]:
    """(ptxas' report, cuobjdump's SASS) of `kernel` (a name expression) of scan source `source`, built by nvcc.

    Args:
        source: A kernel source file of cuda_ops (cuda_build.SCAN_SOURCES).
        kernel: The kernel's name expression, template arguments included.
        arch: The compute capability times ten.
        options: NVRTC's options for it (launch plan's compile_options).
        workdir: Where the translation unit and the cubin go.
        cuobjdump: The disassembler's path.

    Raises:
        RuntimeError: When nvcc fails or cuobjdump gives no SASS (their messages included).
    """
    unit = workdir / "kernel.cu"
    unit.write_text(cuda_build.kernel_source(source) + f"\n\nvoid* inspected_kernel[] = {{(void*)&{kernel}}};\n")
    cubin = workdir / "kernel.cubin"
    nvcc = subprocess.run(["nvcc", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", *options, "-o", str(cubin),
                           str(unit)], capture_output=True, text=True)
    if nvcc.returncode:
        raise RuntimeError(f"nvcc failed on {kernel}:\n{nvcc.stderr[-4000:]}")
    # cuobjdump runs nvdisasm, which the toolkit and the wheels keep beside it
    env = {**os.environ, "PATH": os.pathsep.join((str(Path(cuobjdump).parent), os.environ.get("PATH", "")))}
    dump = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, env=env)
    if dump.returncode or "Function :" not in dump.stdout:
        raise RuntimeError(f"cuobjdump gave no SASS for {kernel}:\n{dump.stderr[-4000:]}")
    return nvcc.stderr, dump.stdout


def ptxas_usage(report: str) -> dict[str, int]:
    """Registers and spill bytes of the one kernel in ptxas' `-v` report.

    Args:
        report: nvcc's standard error with `-Xptxas -v`.
    """
    usage = {}
    m = re.search(r"Used (\d+) registers", report)
    if m:
        usage["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if m:
        usage["spill stores (bytes)"], usage["spill loads (bytes)"] = int(m.group(1)), int(m.group(2))
    return usage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="a", choices=sorted(SHAPES), help="bench_scan.py's shape")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--backward", action="store_true", help="the backward kernel (else the forward)")
    parser.add_argument("--kernel", default=None, help="a kernel name expression instead of the shape's")
    parser.add_argument("--source", default=cuda_build.BAND_SOURCE, choices=cuda_build.SCAN_SOURCES,
                        help="with --kernel: the source file holding it")
    parser.add_argument("--arch", type=int, default=90, help="compute capability times ten")
    parser.add_argument("--waves", type=int, default=12, help="load waves listed")
    parser.add_argument("--cuobjdump", default=None, help="the disassembler (else found on PATH or in its wheel)")
    args = parser.parse_args(argv)
    tuning = scan_tuning.from_env()
    if args.kernel:
        kernel, source, options = args.kernel, args.source, tuning.compile_options
    else:
        batch, dim, height, width, d_state, groups = SHAPES[args.shape]
        plan = cuda_build.launch_plan(ScanShape(batch, dim, height, width, groups, d_state), DTYPES[args.dtype],
                                      backward=args.backward, has_z=False, out_fp32=False, arch=args.arch,
                                      tuning=tuning)
        kernel, source, options = plan.kernel, plan.source, plan.compile_options
    with tempfile.TemporaryDirectory() as tmp:
        report, sass = compile_kernel(source, kernel, args.arch, options, Path(tmp), find_cuobjdump(args.cuobjdump))
    functions = parse_sass(sass)
    if len(functions) != 1:
        raise RuntimeError(f"expected one function in the cubin, found {len(functions)}: {sorted(functions)}")
    instructions = next(iter(functions.values()))
    print(f"{kernel} (sm_{args.arch}, {source})")
    for name, value in ptxas_usage(report).items():
        print(f"  {name}: {value}")
    print(f"  static instructions: {len(instructions)}")
    for kind, n in kind_counts(instructions).most_common():
        print(f"    {kind}: {n}")
    waves = load_waves(instructions)
    listed = ", ".join(map(str, waves[:args.waves])) + (", ..." if len(waves) > args.waves else "")
    print(f"  global-load waves in static order ({len(waves)}, {sum(waves)} loads): {listed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
