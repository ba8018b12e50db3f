#!/usr/bin/env python
"""2DMambaMIL on one slide with the CUDA scan's wavefront kernels on (the default) and off (WAVE=0: the per-band
kernels), interleaved in one process: GPU ms of an inference forward and of a training step (forward,
cross-entropy, backward), fp32 and bf16 autocast. The model has the paper's defaults (dim 128, expand 2: 256 scan
channels, 16 states); the slide is `--patches` random 1024-dim features on random cells of an H x W grid. With
`--compile`, `torch.compile(model)` (wavefront kernels, the public op) is timed beside them: the layers between the
grid's scatter and gather trace as one graph, whose element-wise kernels Inductor fuses (the grid's size reaches the
host first, a graph break of its own).

    python tools/bench_mil_scan.py --grid 200 300 --patches 40000 [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scan_tuning  # noqa: E402

from mamba2d.models.mil import create_mil_model  # noqa: E402
from mamba2d.ops import cuda_build  # noqa: E402


def gpu_ms(fn, reps: int) -> float:
    """Mean event-timed milliseconds of `reps` back-to-back calls: a model step's throughput, host gaps between its
    many kernels included (bench_scan.time_ms times single calls with a sync after each)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=2, default=(200, 300), metavar=("H", "W"))
    parser.add_argument("--patches", type=int, default=40_000)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    args = parser.parse_args(argv)
    height, width = args.grid
    if not 0 < args.patches <= height * width:
        parser.error(f"--patches must be between 1 and H * W = {height * width}, got {args.patches}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.manual_seed(0)
    cells = torch.randperm(height * width)[: args.patches]
    positions = torch.stack([cells // width, cells % width], 1).cuda()
    features = torch.randn(args.patches, 1024, device="cuda")
    label = torch.tensor([1], device="cuda")
    model = create_mil_model("mamba_mil_2d", 1024, 2).cuda()

    def train_step(net, amp: bool) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = net(features, positions).logits
        torch.nn.functional.cross_entropy(logits.float().reshape(1, -1), label).backward()

    def inference(net, amp: bool) -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            net(features, positions)

    default = scan_tuning.from_env()
    per_band = dataclasses.replace(default, wave_min_states=cuda_build.MAX_D_STATE + 1, force_wavefront=False)
    variants = [("wavefront", model, lambda: scan_tuning.models_use(default)),
                ("per-band", model, lambda: scan_tuning.models_use(per_band))]
    if args.compile:  # torch.compile traces the public op, which runs the default launch parameters
        variants.append(("compiled", torch.compile(model), contextlib.nullcontext))
    times: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.rounds):
        for kernels, net, context in variants:
            with context():
                for precision, amp in (("fp32", False), ("bf16 autocast", True)):
                    times.setdefault((kernels, precision, "inference"), []).append(
                        gpu_ms(lambda: inference(net, amp), args.reps))
                    times.setdefault((kernels, precision, "training step"), []).append(
                        gpu_ms(lambda: train_step(net, amp), args.reps))
    print(f"{torch.cuda.get_device_name()}: 2DMambaMIL, {height} x {width} grid, {args.patches} patches "
          f"(wavefront kernels used: {cuda_build.uses_wave(1, 256, height, width, 1, 16, default)})")
    for (kernels, precision, mode), values in sorted(times.items()):
        print(f"{kernels:<10} {precision:<14} {mode:<14} {statistics.median(values):8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
