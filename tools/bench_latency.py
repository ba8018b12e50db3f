#!/usr/bin/env python
"""Inference latency of a backbone at small batches, where the host's launch time, not the GPU, sets the pace:
median wall milliseconds of one synchronised forward (torch.inference_mode, TF32 on), fp32 and bf16 autocast.

    python tools/bench_latency.py vmamba2d_tiny --batches 1 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def latency_ms(model, x, precision: str, warmup: int, iters: int) -> float:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            model(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="timm model name, e.g. vmamba2d_tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--iters", type=int, default=40)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_latency: needs a CUDA GPU", file=sys.stderr)
        return 2
    import timm

    import mamba2d  # noqa: F401  (registers the backbones with timm)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = timm.create_model(args.model).cuda().eval()
    print(f"card: {torch.cuda.get_device_name()}; {args.model}, {args.size} px")
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size, device="cuda")
        for precision in ("fp32", "bf16"):
            ms = latency_ms(model, x, precision, args.warmup, args.iters)
            print(f"batch {batch:>4} {precision}: {ms:8.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
