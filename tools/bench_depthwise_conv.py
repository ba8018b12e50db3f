#!/usr/bin/env python
"""cuDNN's depthwise 3x3 convolution (SS2D's, no bias) at vmamba2d_tiny's maps (batch 128, 224 px: 96 channels at
56², 192 at 28², 384 at 14², 768 at 7²): forward, input gradient and weight gradient in fp32, fp16 and bf16, on
channels_last maps (as SS2D feeds it) and NCHW ones. Time per call from CUDA events (mean of 20 calls after 3
warm-up calls, TF32 allowed as in VMamba's protocol); the per-step line sums a training step's 14 convolutions
(2, 2, 8 and 2 blocks a stage). The floor is the map read once and the output written once at 3 TB/s (10^9 bytes).

    python tools/bench_depthwise_conv.py [--iters 20]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_mil_scan import gpu_ms

#: (batch, channels, side, blocks of vmamba2d_tiny with that map).
SHAPES = ((128, 96, 56, 2), (128, 192, 28, 2), (128, 384, 14, 8), (128, 768, 7, 2))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_depthwise_conv: needs a CUDA GPU")
        return 2
    torch.backends.cudnn.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}, ms per call")
    print("| dtype | layout | batch x channels x side² | forward | input gradient | weight gradient | floor |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for name, dtype in DTYPES.items():
        for layout, fmt in (("channels_last", torch.channels_last), ("NCHW", torch.contiguous_format)):
            step = [0.0, 0.0, 0.0]
            for batch, channels, side, blocks in SHAPES:
                x = torch.randn(batch, channels, side, side, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                weight = torch.randn(channels, 1, 3, 3, device="cuda", dtype=dtype)
                dy = torch.randn_like(x)

                def backward(grads, x=x, weight=weight, dy=dy, channels=channels):
                    return torch.ops.aten.convolution_backward(dy, x, weight, None, [1, 1], [1, 1], [1, 1], False,
                                                               [0, 0], channels, grads)

                times = (gpu_ms(lambda x=x, weight=weight, c=channels: F.conv2d(x, weight, padding=1, groups=c),
                                 args.iters),
                         gpu_ms(lambda: backward([True, False, False]), args.iters),
                         gpu_ms(lambda: backward([False, True, False]), args.iters))
                for i, ms in enumerate(times):
                    step[i] += ms * blocks
                floor = 2 * x.numel() * x.element_size() / 3e12 * 1e3
                print(f"| {name} | {layout} | {batch} x {channels} x {side}² | "
                      + " | ".join(f"{ms:.4f}" for ms in times) + f" | {floor:.4f} |")
            print(f"| {name} | {layout} | a training step (14 convolutions) | "
                  + " | ".join(f"{ms:.3f}" for ms in step) + " | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
