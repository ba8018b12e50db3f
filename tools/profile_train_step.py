#!/usr/bin/env python
"""Where the GPU time of one training step goes: CUDA kernel time per step of a timm model (forward +
cross-entropy + backward, no optimiser step, as the throughput protocol), grouped into kinds (scan kernels, GEMMs,
layer norms, our layout copies, PyTorch's copies and element-wise ops, reductions), then the top kernels. With
--inference: one forward in eval mode under torch.inference_mode (the throughput protocol's inference). With
--compile: the model under `torch.compile` (compiled in the warm-up steps), whose fused Triton kernels are grouped
apart from PyTorch's.

    python tools/profile_train_step.py vmamba2d_tiny --precision bf16 [--batch 128] [--size 224] [--steps 3]

TF32 is on for matmuls and convolutions (VMamba's protocol). The groups come from kernel names, so they are a guide:
"copy/elementwise" holds PyTorch's copy kernels and every other element-wise kernel (GELU, adds, ...); the layer
norms' weight-gradient kernels fall under "other".
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mamba2d  # noqa: E402,F401  (registers the backbones with timm)
from mamba2d.analysis.throughput import allow_tf32  # noqa: E402

#: First match wins; cuDNN's implicit-GEMM convolution kernels (sm90_xmma_*grad*) count as GEMMs.
GROUPS = (
    ("scan forward", r"scan2d_fwd"),
    ("scan backward", r"scan2d_bwd"),
    ("triton reduction", r"triton_(red|per)_"),
    ("triton pointwise", r"triton_poi_"),
    ("gemm", r"gemm|sm90|cutlass|nvjet|xmma"),
    ("convolution", r"conv|cudnn|implicit"),
    ("layer norm", r"layer_norm|LayerNorm"),
    ("layout copy", r"layout_swap"),
    ("SiLU both layouts", r"silu_both"),
    ("reduction", r"reduce"),
    ("copy/elementwise", r"elementwise|copy|vectorized|unrolled"),
)


def kernel_group(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return "other"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="timm model name, e.g. vmamba2d_tiny")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 5 warm-up steps)")
    parser.add_argument("--inference", action="store_true", help="profile the eval-mode forward instead")
    parser.add_argument("--compile", action="store_true", help="profile torch.compile(model)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_train_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    import timm

    allow_tf32()
    model = timm.create_model(args.model).cuda().train(not args.inference)
    runner = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda")
    target = torch.randint(0, model.num_classes, (args.batch,), device="cuda")
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def step() -> None:
        if args.inference:
            with torch.inference_mode(), torch.autocast("cuda", dtype=low) if low else nullcontext():
                runner(x)
            return
        with torch.autocast("cuda", dtype=low) if low else nullcontext():
            loss = F.cross_entropy(runner(x).float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_step = Counter()
    for e in events:
        per_step[kernel_group(e.key)] += e.self_device_time_total / args.steps / 1e3
    total = sum(per_step.values())
    launches = sum(e.count for e in events) / args.steps
    what = "inference forward" if args.inference else "training step"
    compiled = ", torch.compile" if args.compile else ""
    print(f"{torch.cuda.get_device_name()}: {args.model}{compiled}, batch {args.batch}, {args.size} px, "
          f"{args.precision}; GPU time per {what} {total:.2f} ms in {launches:.0f} kernels, copies and memsets")
    for group, ms in per_step.most_common():
        print(f"  {group:<18}{ms:8.2f} ms {100 * ms / total:5.1f} %")
    # what no group names, largest first: where a new kind of kernel (a library's layout transform, say) shows
    others = sorted((e for e in events if kernel_group(e.key) == "other"), key=lambda e: -e.self_device_time_total)
    for e in others[:8]:
        print(f"    other: {e.self_device_time_total / args.steps / 1e3:7.3f} ms, {e.count / args.steps:4.0f} calls "
              f"{e.key[:110]}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=100))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
