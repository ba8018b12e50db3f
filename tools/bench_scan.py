#!/usr/bin/env python
"""Benchmark the CUDA 2D selective scan: fwd and fwd+bwd times, effective bandwidth, memory-floor ratio.

The memory floor is the bytes that must move once (inputs read + outputs written) over the device-to-device copy
bandwidth measured in the same run (bytes read + written). Timing: CUDA events, warm-up, median of many runs; "fwd
ms" / "fwd+bwd" are from the call to the end of the last kernel (host launch overhead included), "gpu fwd" / "gpu
f+b" with the GPU kept busy while the host enqueues (kernel time alone), "host fwd" / "host f+b" the host's time to
enqueue one call (Python, dispatch, autograd, launches) while the GPU is busy. Gradients are fresh each rep.
Shapes (batch x dim x H x W, N, G), the four 2DVMamba directions one per group where G = 4:
  a) 128x384x56x56, N=1, G=4   b) 128x1536x14x14, N=1, G=4   c) 1x256x200x300, N=16, G=1   d) 16x384x128x128, N=1, G=4
Upstream 2DMamba's kernel on an H100 (NVIDIA H100 80GB HBM3), fwd / fwd+bwd ms with fp32 and with fp16 inputs, is
printed beside ours at the same precision only (upstream has no bf16 kernel: bf16 rows have no upstream ratio); the
targets are fwd+bwd <= 0.4x upstream at a, b, d and <= 1/5 at c, fwd <= 1.5x and fwd+bwd <= 2.5x the memory floor
at a, b, d.

    python tools/bench_scan.py [--shapes a,b,c,d] [--dtypes fp32,fp16,bf16] [--reps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scan_tuning  # noqa: E402

#: The scan these benchmarks time: the CUDA kernels with the tuning MAMBA2D_SCAN_TUNE asks for (tools/scan_tuning.py).
selective_scan_2d = scan_tuning.scan(scan_tuning.from_env())

SHAPES = {
    "a": (128, 384, 56, 56, 1, 4),
    "b": (128, 1536, 14, 14, 1, 4),
    "c": (1, 256, 200, 300, 16, 1),
    "d": (16, 384, 128, 128, 1, 4),
}
# Upstream 2DMamba kernel on an H100 80GB HBM3: (fwd ms, fwd+bwd ms) for fp32 and fp16 inputs, measured when the
# kernels were first benchmarked (upstream's code is not part of this repository).
UPSTREAM = {
    "a": {"fp32": (1.580, 7.53), "fp16": (1.547, 6.75)},
    "b": {"fp32": (0.405, 2.04), "fp16": (0.399, 1.89)},
    "c": {"fp32": (3.04, 13.29), "fp16": (2.96, 13.27)},
    "d": {"fp32": (0.855, 4.25), "fp16": (0.851, 4.14)},
}
TARGET_UPSTREAM = {"a": 0.4, "b": 0.4, "c": 0.2, "d": 0.4}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_ms(fn, reps: int, warmup: int = 3, kernels_only: bool = False) -> float:
    """Median event-timed milliseconds of fn. With `kernels_only` the GPU is kept busy (a spin kernel) while the host
    enqueues fn, so the events time its kernels back to back, without the host's launch overhead (Python, dispatch,
    CuPy) between them."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if kernels_only:
            torch.cuda._sleep(5_000_000)  # a few ms of GPU time, longer than the host needs to enqueue fn
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median host milliseconds to enqueue fn (Python, dispatch, autograd, CuPy, launches) while a spin kernel keeps
    the GPU busy, so that no call waits for the GPU."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda._sleep(5_000_000)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def copy_bandwidth(reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = 1 << 28  # 1 GiB of float32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def make_inputs(shape, dtype):
    batch, dim, H, W, N, G = shape
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, device="cuda", generator=g)

    return {
        "u": rnd(batch, dim, H, W).to(dtype),
        "delta": (rnd(batch, dim, H, W) * 0.5 - 1).to(dtype),
        "A": -torch.exp(rnd(dim, N) * 0.5),
        "B": rnd(batch, G, N, H, W).to(dtype),
        "C": rnd(batch, G, N, H, W).to(dtype),
        "D": rnd(dim),
        "delta_bias": rnd(dim) * 0.1,
    }


def floor_bytes(shape, dtype) -> tuple[int, int]:
    batch, dim, H, W, N, G = shape
    e = torch.finfo(dtype).bits // 8
    x = batch * dim * H * W * e  # one (batch, dim, H, W) tensor
    bc = batch * G * N * H * W * e  # one (batch, G, N, H, W) tensor
    fwd = 2 * x + 2 * bc + x  # read u, delta, B, C; write y
    bwd = 3 * x + 2 * bc + 2 * x + 2 * bc  # read u, delta, dy, B, C; write du, ddelta, dB, dC
    return fwd, fwd + bwd


def bench(name, dtype_name, reps, bandwidth, accumulate_grads=False):
    shape = SHAPES[name]
    dtype = DTYPES[dtype_name]
    batch, dim, H, W, N, G = shape
    directions = ["tl_hv", "tl_vh", "br_hv", "br_vh"] if G == 4 else "tl_hv"
    inputs = make_inputs(shape, dtype)

    def fwd():
        with torch.no_grad():
            return selective_scan_2d(**inputs, direction=directions, backend="cuda")

    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    dy = torch.randn(batch, dim, H, W, device="cuda").to(dtype)

    def fwd_bwd():
        # Fresh gradients each time, as in training (zero_grad(set_to_none=True)): accumulating into the previous
        # rep's .grad would add two u-sized read-modify-writes that belong to the benchmark, not to the scan.
        if not accumulate_grads:
            for v in leaves.values():
                v.grad = None
        y = selective_scan_2d(**leaves, direction=directions, backend="cuda")
        y.backward(dy)

    fwd_ms = time_ms(fwd, reps)
    fb_ms = time_ms(fwd_bwd, reps)
    fwd_gpu_ms = time_ms(fwd, reps, kernels_only=True)
    fb_gpu_ms = time_ms(fwd_bwd, reps, kernels_only=True)
    fwd_host_ms, fb_host_ms = host_ms(fwd, reps), host_ms(fwd_bwd, reps)
    fb, fbb = floor_bytes(shape, dtype)
    floor_f = fb / (bandwidth * 1e9) * 1e3
    floor_fb = fbb / (bandwidth * 1e9) * 1e3
    up_f, up_fb = UPSTREAM[name].get(dtype_name, (None, None))
    row = {
        "shape": name,
        "dims": "x".join(map(str, shape[:4])) + f" N={N} G={G}",
        "dtype": dtype_name,
        "fwd_ms": fwd_ms,
        "fwdbwd_ms": fb_ms,
        "fwd_gpu_ms": fwd_gpu_ms,
        "fwdbwd_gpu_ms": fb_gpu_ms,
        "fwd_host_ms": fwd_host_ms,
        "fwdbwd_host_ms": fb_host_ms,
        "fwd_GBps": fb / (fwd_ms * 1e-3) / 1e9,
        "fwdbwd_GBps": fbb / (fb_ms * 1e-3) / 1e9,
        "fwd_floor_ms": floor_f,
        "fwdbwd_floor_ms": floor_fb,
        "fwd_vs_floor": fwd_ms / floor_f,
        "fwdbwd_vs_floor": fb_ms / floor_fb,
        "upstream_fwd_ms": up_f,
        "upstream_fwdbwd_ms": up_fb,
        "fwdbwd_vs_upstream": fb_ms / up_fb if up_fb else None,
    }
    target_up = TARGET_UPSTREAM[name]
    row["target_upstream_ok"] = None if up_fb is None else row["fwdbwd_vs_upstream"] <= target_up
    row["target_floor_ok"] = None if name == "c" else (row["fwd_vs_floor"] <= 1.5 and row["fwdbwd_vs_floor"] <= 2.5)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="a,b,c,d")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--accumulate-grads", action="store_true",
                        help="keep the leaves' .grad between reps (adds gradient accumulation to what is timed)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_scan: needs a CUDA GPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"card: {card}; measured D2D copy bandwidth {bandwidth:.0f} GB/s (read + write)")
    rows = []
    for name in args.shapes.split(","):
        for dtype_name in args.dtypes.split(","):
            row = bench(name, dtype_name, args.reps, bandwidth, args.accumulate_grads)
            torch.cuda.empty_cache()  # the shape's inputs went with bench's frame
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = (f"{'shape':<6}{'dtype':<6}{'fwd ms':>9}{'fwd+bwd':>9}{'gpu fwd':>9}{'gpu f+b':>9}{'host fwd':>9}"
              f"{'host f+b':>9}{'fwd GB/s':>10}{'fb GB/s':>9}"
              f"{'fwd/flr':>9}{'fb/flr':>8}{'upstr fb':>9}{'fb/upstr':>9}  targets")
    print(header)
    for r in rows:
        tgt_up = "no upstream kernel" if r["target_upstream_ok"] is None else \
            f"upstream {'ok' if r['target_upstream_ok'] else 'MISS'}"
        up_fb, up_ratio = r["upstream_fwdbwd_ms"], r["fwdbwd_vs_upstream"]
        tgt_fl = "" if r["target_floor_ok"] is None else f", floor {'ok' if r['target_floor_ok'] else 'MISS'}"
        print(f"{r['shape']:<6}{r['dtype']:<6}{r['fwd_ms']:>9.3f}{r['fwdbwd_ms']:>9.3f}{r['fwd_gpu_ms']:>9.3f}"
              f"{r['fwdbwd_gpu_ms']:>9.3f}{r['fwd_host_ms']:>9.3f}{r['fwdbwd_host_ms']:>9.3f}{r['fwd_GBps']:>10.0f}"
              f"{r['fwdbwd_GBps']:>9.0f}{r['fwd_vs_floor']:>9.2f}{r['fwdbwd_vs_floor']:>8.2f}"
              f"{up_fb if up_fb else '-':>9}{f'{up_ratio:.2f}' if up_ratio else '-':>9}  {tgt_up}{tgt_fl}")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "copy_GBps": bandwidth, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
