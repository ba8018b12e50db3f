#!/usr/bin/env python
"""The layer-norm backward at vmamba2d_tiny's shapes (batch 128, 224 px: 56², 28², 14², 7² pixels of 96-768
channels): our kernel (mamba2d.ops.cuda_layer_norm, with the sum of its per-block weight and bias partial sums)
against `aten::native_layer_norm_backward` from the same kept input and statistics, for the three (input, kept)
dtype pairs the backbone meets: fp32/fp32 (fp32 training), fp32/fp16 (a residual-stream norm under fp16 autocast,
which keeps a 16-bit copy) and fp16/fp16. Kernel time per call from torch.profiler (CUDA kernels only, mean of 10
calls after 3 warm-up calls), so the host's autograd overhead is left out; GB/s counts the kept input and the
output gradient read and the input gradient written (10^9 bytes).

    python tools/bench_layer_norm.py [--iters 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mamba2d.ops import cuda_layer_norm  # noqa: E402

#: (rows, channels) of the backbone's norms at batch 128, 224 px, stage by stage.
SHAPES = ((128 * 56 * 56, 96), (128 * 28 * 28, 192), (128 * 14 * 14, 384), (128 * 7 * 7, 768))
#: (input dtype, output dtype): the output's dtype decides what the forward keeps for the backward.
DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.float16))


def kernel_ms(fn, iters: int) -> float:
    """Mean CUDA kernel time of one call of `fn` in ms (torch.profiler, after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return total / iters / 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}: layer-norm backward, ms per call (CUDA kernels), GB = 10^9 bytes")
    for rows, channels in SHAPES:
        for in_dtype, out_dtype in DTYPE_PAIRS:
            x = torch.randn(rows, channels, device="cuda").to(in_dtype).requires_grad_()
            weight, bias = (torch.randn(channels, device="cuda").requires_grad_() for _ in range(2))
            out = cuda_layer_norm.layer_norm(x, weight, bias, 1e-5, out_dtype)
            kept, _, _, mean, rstd = out.grad_fn.saved_tensors
            mean = torch.zeros_like(rstd) if mean is None else mean  # a 16-bit copy keeps the deviations
            dy = torch.randn_like(out)
            weight_k, bias_k = weight.detach().to(kept.dtype), bias.detach().to(kept.dtype)

            def ours():
                torch.autograd.grad(out, (x, weight, bias), dy, retain_graph=True)

            def aten():
                torch.ops.aten.native_layer_norm_backward(dy.to(kept.dtype), kept, [channels], mean, rstd, weight_k,
                                                          bias_k, [True, True, True])

            moved = sum(t.numel() * t.element_size() for t in (kept, dy, x)) / 1e9
            ours_ms, aten_ms = kernel_ms(ours, args.iters), kernel_ms(aten, args.iters)
            print(f"rows {rows:>7} C {channels:>4} input {str(in_dtype)[6:]:>7} kept {str(kept.dtype)[6:]:>7}: "
                  f"ours {ours_ms:.3f} ms ({moved / ours_ms * 1e3:.0f} GB/s), aten {aten_ms:.3f} ms "
                  f"({moved / aten_ms * 1e3:.0f} GB/s), ours / aten {ours_ms / aten_ms:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
