#!/usr/bin/env python
"""Where the host's time of one eager training step goes, for steps the host cannot enqueue as fast as the GPU runs
them (docs/performance.md, *The host's pace*), on a timm model (forward + cross-entropy + backward, no optimiser
step, as the throughput protocol) or, with --scan SHAPE, on one scan fwd+bwd of tools/bench_scan.py's shape.

Three views of the same steps: the host milliseconds per step without a profiler; torch.profiler's CPU events: the
PyTorch ops dispatched per step and the host time of each backward node (autograd runs a CUDA backward on its own
threads, which cProfile does not see); cProfile of the calling thread (the forward, and the backward's wait), each
function's own time summed by where it lives (our Python in mamba2d, torch's Python, torch's C++ entry points: one
per PyTorch op, dispatch and launch included, CuPy, the rest), then the functions with the most own time.

    python tools/profile_host.py vmamba2d_tiny [--precision fp16] [--batch 32] [--warmup 10] [--timed 20] [--steps 5]
    python tools/profile_host.py --scan b [--precision fp16]

A model step at the default batch takes the GPU a fraction of the host's time, so no call waits for the GPU; a scan
call is enqueued while a spin kernel keeps the GPU busy (a model step's thousands of launches would fill the
launch queue behind it and wait). Profilers add their own cost to every call: compare within one view, and take
host milliseconds from the unprofiled line.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import AUTOCAST  # noqa: E402  (precision name -> autocast dtype)

from mamba2d.analysis.throughput import allow_tf32  # noqa: E402

#: torch.profiler's name of the event for one backward node's run (its host time, launches included).
BACKWARD_NODE = "autograd::engine::evaluate_function: "
#: (group, test on a cProfile entry's (file, function name)); the first that holds wins.
GROUPS = (
    ("mamba2d (our Python)", lambda file, name: "mamba2d" in file),
    ("CuPy", lambda file, name: "cupy" in file or "cupy" in name or "launchKernel" in name),
    ("torch C++ entry points (ops)", lambda file, name: file == "~" and ("torch" in name or "Tensor" in name)),
    ("torch Python", lambda file, name: "/torch/" in file),
    ("other", lambda file, name: True),
)


def entry_group(file: str, name: str) -> str:
    """The GROUPS name of a cProfile entry (file "~" marks a builtin, named by its function name).

    Args:
        file: The entry's file name.
        name: The entry's function name.
    """
    return next(group for group, test in GROUPS if test(file, name))


def model_step(args):
    """A function running one eager training step of `args.model` at `args.batch`."""
    import timm

    import mamba2d  # noqa: F401  (registers the backbones with timm)

    model = timm.create_model(args.model).cuda().train()
    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda")
    target = torch.randint(0, model.num_classes, (args.batch,), device="cuda")
    low = AUTOCAST[args.precision]

    def step() -> None:
        with torch.autocast("cuda", dtype=low) if low else nullcontext():
            loss = F.cross_entropy(model(x).float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def scan_step(args):
    """A function running one fwd+bwd of the CUDA scan at tools/bench_scan.py's shape `args.scan`."""
    from bench_scan import DTYPES, SHAPES, make_inputs, selective_scan_2d

    shape = SHAPES[args.scan]
    batch, dim, height, width, _, groups = shape
    directions = ["tl_hv", "tl_vh", "br_hv", "br_vh"] if groups == 4 else "tl_hv"
    dtype = DTYPES[args.precision]
    leaves = {k: v.detach().requires_grad_() for k, v in make_inputs(shape, dtype).items()}
    dy = torch.randn(batch, dim, height, width, device="cuda").to(dtype)

    def step() -> None:
        for v in leaves.values():
            v.grad = None
        selective_scan_2d(**leaves, direction=directions, backend="cuda").backward(dy)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="vmamba2d_tiny", help="timm model name")
    parser.add_argument("--scan", choices=("a", "b", "c", "d"), default=None,
                        help="profile one scan fwd+bwd at this bench_scan shape instead of a model step")
    parser.add_argument("--precision", choices=tuple(AUTOCAST), default="fp16")
    parser.add_argument("--batch", type=int, default=32, help="images per step (the host's work hardly depends on it)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--timed", type=int, default=20, help="steps of the unprofiled host time")
    parser.add_argument("--steps", type=int, default=5, help="steps of each profiled view")
    parser.add_argument("--top", type=int, default=30, help="entries listed per view (backward nodes, ops, functions)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_host: needs a CUDA GPU", file=sys.stderr)
        return 2
    allow_tf32()
    step = scan_step(args) if args.scan else model_step(args)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()

    def busy_gpu() -> None:  # a scan: longer than the host needs to enqueue the steps, so no call waits for the GPU
        if args.scan:
            torch.cuda._sleep(4_000_000_000)

    busy_gpu()
    start = time.perf_counter()
    for _ in range(args.timed):
        step()
    host_ms = (time.perf_counter() - start) / args.timed * 1e3
    torch.cuda.synchronize()

    busy_gpu()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    torch.cuda.synchronize()
    events = prof.events()
    # top-level aten calls: those no other aten op called
    top_level = Counter(e.name for e in events if e.name.startswith("aten::")
                        and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
    ops = sum(top_level.values()) / args.steps
    backward = Counter()
    for e in events:
        if e.name.startswith(BACKWARD_NODE):
            backward[e.name[len(BACKWARD_NODE):]] += e.cpu_time_total / args.steps / 1e3

    busy_gpu()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        step()
    profiler.disable()
    torch.cuda.synchronize()

    stats = pstats.Stats(profiler)
    own = Counter()
    rows = []
    for (file, _, name), (_, _, tottime, _, _) in stats.stats.items():
        own[entry_group(file, name)] += tottime / args.steps * 1e3
        rows.append((tottime / args.steps * 1e3, f"{Path(file).name}:{name}" if file != "~" else name))
    what = f"scan fwd+bwd, shape {args.scan}" if args.scan else f"{args.model} training step, batch {args.batch}"
    print(f"{torch.cuda.get_device_name()}: {what}, {args.precision}; host {host_ms:.2f} ms per step unprofiled "
          f"(mean of {args.timed} after {args.warmup}), {ops:.0f} PyTorch ops dispatched per step "
          "(top-level aten calls)")
    print(f"backward nodes' host time per step (torch.profiler), {sum(backward.values()):.2f} ms in all:")
    for node, ms in backward.most_common(args.top):
        print(f"  {ms:8.3f} ms  {node}")
    print("top-level PyTorch ops dispatched per step, by name:")
    for name, count in top_level.most_common(args.top):
        print(f"  {count / args.steps:8.1f}  {name}")
    total = sum(own.values())
    print(f"calling thread's own time per step under cProfile, {total:.2f} ms:")
    for group, ms in own.most_common():
        print(f"  {group:<30}{ms:8.2f} ms {100 * ms / total:5.1f} %")
    print("its functions with the most own time (ms per step):")
    for ms, where in sorted(rows, reverse=True)[: args.top]:
        print(f"  {ms:8.3f}  {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
