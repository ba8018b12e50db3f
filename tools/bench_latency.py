#!/usr/bin/env python
"""Latency of a backbone at small batches, where the host's launch time, not the GPU, sets the pace: median wall
milliseconds of one synchronised call (TF32 on), fp32 and 16-bit autocast, and the host's part of it: the time until
the call returns, before the synchronise (Python, dispatch, autograd and launches; where it is close to the wall
time, the host sets the pace). Inference: one forward under torch.inference_mode. With --training: one step of the
throughput protocol (train mode, forward + cross-entropy + backward, gradients set to None, no optimiser step); at
batch 128 a host slower than the GPU's step time is what separates eager from CUDA-graph throughput. Each (batch,
precision) runs in a process of its own, as tools/bench_models.py's configurations do (on an H100 a fit step timed
after another configuration in the same process took 24-34 % longer). A second pair of figures times the same calls
back to back, synchronised only at the end, as the throughput protocol runs them: the host's time per call until the
last returns, and the wall time per call; where the synchronised host time exceeds the back-to-back one, the
synchronise itself (an idle GPU at each call's start) costs host time.

    python tools/bench_latency.py vmamba2d_tiny --batches 1 16 [--training] [--precisions fp32 fp16 bf16]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mamba2d.analysis.throughput import allow_tf32  # noqa: E402

AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def latency_ms(model, x, precision: str, training: bool, warmup: int, iters: int) -> tuple[float, ...]:
    """(median wall ms, median host ms) of one synchronised call of `model` on `x`, then (host ms, wall ms) per call of
    `iters` calls back to back."""
    dtype = AUTOCAST[precision]
    autocast = torch.autocast("cuda", dtype=dtype) if dtype else nullcontext()
    target = torch.randint(0, max(getattr(model, "num_classes", 0), 1), (x.shape[0],), device=x.device)

    def call():
        if training:
            with autocast:
                loss = F.cross_entropy(model(x).float(), target)
            loss.backward()
            model.zero_grad(set_to_none=True)  # as the throughput protocol: no gradient accumulated into the last
        else:
            with torch.inference_mode(), autocast:
                model(x)

    for _ in range(warmup):
        call()
    walls, hosts = [], []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        returned = time.perf_counter()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
        hosts.append(returned - start)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    returned = time.perf_counter()
    torch.cuda.synchronize()
    back_to_back = ((returned - start) / iters, (time.perf_counter() - start) / iters)
    return tuple(t * 1e3 for t in (statistics.median(walls), statistics.median(hosts), *back_to_back))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="timm model name, e.g. vmamba2d_tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--training", action="store_true", help="time a training step instead of a forward")
    parser.add_argument("--precisions", nargs="+", choices=tuple(AUTOCAST), default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--no-header", action="store_true", help=argparse.SUPPRESS)  # a child process of main
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_latency: needs a CUDA GPU", file=sys.stderr)
        return 2
    what = "training step (forward + cross-entropy + backward)" if args.training else "forward (inference)"
    if not args.no_header:
        print(f"card: {torch.cuda.get_device_name()}; {args.model}, {args.size} px, {what}; milliseconds", flush=True)
    configs = [(batch, precision) for batch in args.batches for precision in args.precisions]
    if len(configs) > 1:
        common = [args.model, f"--size={args.size}", f"--warmup={args.warmup}", f"--iters={args.iters}", "--no-header",
                  *(["--training"] if args.training else [])]
        for batch, precision in configs:
            subprocess.run([sys.executable, __file__, *common, "--batches", str(batch), "--precisions", precision],
                           check=True)
        return 0
    import timm

    import mamba2d  # noqa: F401  (registers the backbones with timm)

    allow_tf32()
    model = timm.create_model(args.model).cuda().train(args.training)
    batch, precision = configs[0]
    x = torch.randn(batch, 3, args.size, args.size, device="cuda")
    wall, host, host_b2b, wall_b2b = latency_ms(model, x, precision, args.training, args.warmup, args.iters)
    print(f"batch {batch:>4} {precision}: wall {wall:8.2f} ms, host {host:8.2f} ms; back to back: host {host_b2b:8.2f} "
          f"ms, wall {wall_b2b:8.2f} ms a call", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
