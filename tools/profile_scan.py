#!/usr/bin/env python
"""Where the time of one CUDA 2D-scan fwd+bwd goes: a per-kernel table from torch.profiler (our kernels and the
PyTorch reductions around them), for one benchmark shape of tools/bench_scan.py.

    python tools/profile_scan.py --shape a --dtype fp32 [--batch 32] [--iters 5]

Under Nsight Compute, profile one forward and one backward launch after the warm-up:
    ncu -k regex:mamba2d_scan2d --launch-skip 4 --launch-count 2 --set full -o rep python tools/profile_scan.py --ncu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_scan import DTYPES, SHAPES, make_inputs, selective_scan_2d  # noqa: E402  (MAMBA2D_SCAN_TUNE applied)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="a", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=None, help="override the shape's batch")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--ncu", action="store_true", help="one plain step after the warm-up (no torch.profiler)")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    if args.batch:
        shape = (args.batch, *shape[1:])
    batch, dim, H, W, N, G = shape
    directions = ["tl_hv", "tl_vh", "br_hv", "br_vh"] if G == 4 else "tl_hv"
    leaves = {k: v.detach().requires_grad_() for k, v in make_inputs(shape, DTYPES[args.dtype]).items()}
    dy = torch.randn(batch, dim, H, W, device="cuda").to(DTYPES[args.dtype])

    def step():
        for v in leaves.values():
            v.grad = None
        selective_scan_2d(**leaves, direction=directions, backend="cuda").backward(dy)

    for _ in range(2):  # warm-up: compile and allocate
        step()
    torch.cuda.synchronize()
    if args.ncu:
        step()
        torch.cuda.synchronize()
        return 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}: shape {args.shape} {shape} {args.dtype}, {args.iters} fwd+bwd")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
