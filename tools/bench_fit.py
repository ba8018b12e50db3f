#!/usr/bin/env python
"""Training steps through the fit path itself (`mamba2d fit`'s Lightning Trainer and `ImageClassifier`: forward,
loss, backward, AdamW step, gradient zeroing and Lightning's own bookkeeping): *eager*, *compiled*
(`torch_compile=True`) and *compiled+graph* (`compile_mode="reduce-overhead"`: torch.compile's CUDA graphs).

One random batch, already on the GPU, is served `--steps` times (no data loading, no logger, no checkpoints); a
callback synchronises at the start of every training batch, and the median of the step times after the first
`--skip` (which include the compilation) is reported as milliseconds per step and images/s, with the run's peak
memory (`torch.cuda.max_memory_allocated`, GB = 10^9 bytes); each variant runs in a process of its own. TF32 on
(VMamba's protocol); `--precision` is the Trainer's (`16-mixed` = float16 autocast with a gradient scaler).

    python tools/bench_fit.py [--model vmamba2d_tiny] [--batch 128] [--precision 16-mixed] [--steps 40] [--skip 15]
        [--variants eager compiled compiled+graph]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lightning as L  # noqa: E402

from mamba2d.analysis.throughput import allow_tf32  # noqa: E402
from mamba2d.tasks.classification import ImageClassifier  # noqa: E402


class StepTimer(L.Callback):
    """Wall-clock time at the start of every training batch, after a synchronise."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.starts.append(time.perf_counter())


#: `ImageClassifier`'s compile arguments of each variant.
VARIANTS = {
    "eager": {},
    "compiled": {"torch_compile": True},
    "compiled+graph": {"torch_compile": True, "compile_mode": "reduce-overhead"},
}


def step_ms(model: str, batch: int, size: int, precision: str, steps: int, skip: int,
            variant: str) -> tuple[float, float]:
    """(median milliseconds of a training step after the first `skip`, peak GB allocated in the run).

    Args:
        model: timm name of the backbone.
        batch: Images per step.
        size: Image side in pixels.
        precision: The Trainer's precision.
        steps: Training steps run.
        skip: Steps left out of the median (warm-up and compilation).
        variant: A key of VARIANTS.
    """
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    loader = torch.utils.data.DataLoader([(x, y)] * steps, batch_size=None)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer])
    trainer.fit(ImageClassifier(backbone=model, num_classes=1000, **VARIANTS[variant]), loader)
    torch.cuda.synchronize()
    starts = [*timer.starts, time.perf_counter()]
    ms = 1e3 * statistics.median(b - a for a, b in zip(starts[skip:-1], starts[skip + 1:]))
    return ms, torch.cuda.max_memory_allocated() / 1e9


def main(argv: list[str] | None = None) -> int:
    """Time eager and compiled fit steps and print them.

    Args:
        argv: Command-line arguments (default: sys.argv[1:]).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vmamba2d_tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--precision", default="16-mixed")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=15)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    if not 0 <= args.skip < args.steps - 1:
        parser.error(f"--skip must leave at least two steps of --steps {args.steps}, got {args.skip}")
    allow_tf32()
    if len(args.variants) == 1:
        print(f"{torch.cuda.get_device_name()}: {args.model}, batch {args.batch} at {args.size}², {args.precision}, "
              f"fit path with AdamW; median of steps {args.skip + 1}-{args.steps}", flush=True)
        variant = args.variants[0]
        ms, peak = step_ms(args.model, args.batch, args.size, args.precision, args.steps, args.skip, variant)
        print(f"{variant:<15} {ms:7.1f} ms a step, {args.batch / ms * 1e3:6.0f} images/s, peak {peak:.2f} GB",
              flush=True)
        return 0
    # One process per variant: on an H100, whichever variant ran second in a process took 24-34 % longer a step
    # than when it ran first.
    common = [f"--{name}={getattr(args, name)}" for name in ("model", "batch", "size", "precision", "steps", "skip")]
    for variant in args.variants:
        subprocess.run([sys.executable, __file__, *common, "--variants", variant], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
