#!/usr/bin/env python
"""The layout copies of mamba2d.ops.cuda_layout against PyTorch's copies of the same permuted tensors, at the maps
a VSSM meets: vmamba2d_tiny's SS2D inner maps at batch 128, 224 px (192-1536 channels, 56² to 7² pixels), and one
token mixer's (batch 1, 256 channels) from 256² to 2048² pixels. Then the four routes' sum written channels_last
(`group_sum_channels_last`) against the sum and the layout copy apart, at vmamba2d_tiny's maps. Kernel time per call
from torch.profiler (CUDA kernels only, mean of `--iters` calls after 3 warm-up calls); GB/s counts the maps read and
written once (10^9 bytes). bfloat16 moves the same bits as float16, on the same kernel.

    python tools/bench_layout.py [--iters 10] [--dtypes fp32 fp16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_layer_norm import kernel_ms  # noqa: E402

from mamba2d.ops import cuda_layout  # noqa: E402

CL = torch.channels_last
#: (name, ours, PyTorch's, the input's layout); the maps are square, so a transposed map has the map's shape
COPIES = (
    ("channels_last -> NCHW", cuda_layout.to_nchw, lambda x: x.contiguous(), CL),
    ("NCHW -> channels_last", cuda_layout.to_channels_last, lambda x: x.contiguous(memory_format=CL),
     torch.contiguous_format),
    ("channels_last -> transposed NCHW", cuda_layout.to_transposed_nchw,
     lambda x: x.transpose(-1, -2).contiguous(), CL),
    ("transposed NCHW -> channels_last", cuda_layout.from_transposed_nchw,
     lambda x: x.transpose(-1, -2).contiguous(memory_format=CL), torch.contiguous_format),
)
MODEL_MAPS = ((128, 192, 56), (128, 384, 28), (128, 768, 14), (128, 1536, 7))
MIXER_MAPS = ((1, 256, 256), (1, 256, 512), (1, 256, 1024), (1, 256, 2048))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "fp16"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it times CUDA kernels")
    print(f"{torch.cuda.get_device_name()}: layout copies, ms per call (CUDA kernels), GB = 10^9 bytes")
    print("| copy | dtype | batch x channels x side² | PyTorch ms | ours ms | ours / PyTorch | ours GB/s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for name, ours, pytorch, layout in COPIES:
        for dtype_name in args.dtypes:
            for batch, channels, side in MODEL_MAPS + MIXER_MAPS:
                x = torch.randn(batch, channels, side, side, device="cuda", dtype=DTYPES[dtype_name])
                x = x.contiguous(memory_format=layout)
                assert torch.equal(ours(x), pytorch(x))
                theirs_ms = kernel_ms(lambda x=x: pytorch(x), args.iters)
                ours_ms = kernel_ms(lambda x=x: ours(x), args.iters)
                rate = 2 * x.numel() * x.element_size() / (ours_ms * 1e-3) / 1e9
                print(f"| {name} | {dtype_name} | {batch} x {channels} x {side}² | {theirs_ms:.3f} | {ours_ms:.3f} "
                      f"| {ours_ms / theirs_ms:.2f} | {rate:.0f} |", flush=True)
    print("\n| four routes summed into channels_last | dtype | batch x channels x side² | sum, then layout copy ms "
          "| ours ms | ours / apart | ours GB/s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for dtype_name in args.dtypes:
        for batch, channels, side in MODEL_MAPS:
            x = torch.randn(batch, 4 * channels, side, side, device="cuda", dtype=DTYPES[dtype_name])

            def apart(x=x, channels=channels):
                return cuda_layout.to_channels_last(x.unflatten(1, (4, channels)).sum(dim=1, dtype=x.dtype))

            assert torch.equal(cuda_layout.group_sum_channels_last(x, 4), apart())
            apart_ms = kernel_ms(apart, args.iters)
            ours_ms = kernel_ms(lambda x=x: cuda_layout.group_sum_channels_last(x, 4), args.iters)
            rate = 1.25 * x.numel() * x.element_size() / (ours_ms * 1e-3) / 1e9
            print(f"| group sum | {dtype_name} | {batch} x {channels} x {side}² | {apart_ms:.3f} | {ours_ms:.3f} "
                  f"| {ours_ms / apart_ms:.2f} | {rate:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
