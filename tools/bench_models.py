#!/usr/bin/env python
"""Model-level speed and memory against the upstream anchors: one table of ours beside upstream's figures.

VMamba's throughput protocol (`mamba2d.analysis.throughput.measure`): batch 128 at 224², one random batch reused,
TF32 on, warm-up then timed iterations; *training* is forward + cross-entropy + backward without the optimiser step,
*inference* the forward under `torch.inference_mode`. Precisions: fp32 (float32 weights and math), fp16 / bf16
(float16 / bfloat16 autocast; upstream's "AMP" is fp16 autocast). Variants: *eager*, *compiled*
(`torch.compile(model)`, compile time spent in the warm-up), *compiled+graph* (`torch.compile(model,
mode="reduce-overhead")`: torch.compile's own CUDA graphs, judged against the compiled targets), *eager+ckpt*
(activation checkpointing per block, training only) and *eager+graph* (the eager model's forward and backward
replayed as CUDA graphs, `torch.cuda.make_graphed_callables`; training only, no target of its own: it shows the
GPU's pace where the host falls behind, as eager fp16 training does on some hosts). Peak memory is
`torch.cuda.max_memory_allocated` in GB (10^9 bytes). Each (model, variant, mode, precision) runs in a process of its
own: on an H100 a fit step timed after another configuration in the same process took 24-34 % longer
(`tools/bench_fit.py`), so an in-process table would depend on its order.

Upstream anchors (2DVMamba-T and VMamba-T, rebuilt from upstream's code and measured on an H100 80GB HBM3 when the
targets were set; that code is not part of this repository, so the figures are quoted) are compared at the same
precision only; bf16 rows stand alone. The target column is the ratio to upstream the model-speed work aims at
(memory: at most the ratio given).

    python tools/bench_models.py [--models vmamba2d_tiny vmamba_tiny]
        [--variants eager compiled compiled+graph eager+ckpt eager+graph] [--precisions fp32 fp16 bf16]
        [--batch 128] [--warmup 20] [--iters 30] [--json out.json]

`MAMBA2D_SCAN_TUNE` (`tools/scan_tuning.py`) runs the models' CUDA scans with other launch parameters, for A/B runs
of whole models (e.g. `MAMBA2D_SCAN_TUNE=TW=8`: the 1D twin's rows in tiles as wide as a block, as before one-warp
tiles became the default); unset, the models call the public op.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scan_tuning  # noqa: E402

from mamba2d.analysis.throughput import PRECISIONS, Measurement, allow_tf32, measure  # noqa: E402

#: (model, mode, precision) -> (upstream name, images/s, peak training GB or None), upstream on an H100 80GB HBM3.
UPSTREAM = {
    ("vmamba2d_tiny", "training", "fp32"): ("2DVMamba-T", 805.0, 23.19),
    ("vmamba2d_tiny", "training", "fp16"): ("2DVMamba-T", 943.0, 14.35),
    ("vmamba2d_tiny", "inference", "fp32"): ("2DVMamba-T", 2584.0, None),
    ("vmamba2d_tiny", "inference", "fp16"): ("2DVMamba-T", 2720.0, None),
    ("vmamba_tiny", "training", "fp32"): ("VMamba-T", 941.0, None),
    ("vmamba_tiny", "training", "fp16"): ("VMamba-T", 1085.0, None),
    ("vmamba_tiny", "inference", "fp32"): ("VMamba-T", 2723.0, None),
    ("vmamba_tiny", "inference", "fp16"): ("VMamba-T", 2888.0, None),
}
#: (model, mode, variant) -> speed ratio to upstream aimed at; every compiled variant is judged against "compiled".
SPEED_TARGET = {
    ("vmamba2d_tiny", "training", "eager"): 2.0,
    ("vmamba2d_tiny", "inference", "eager"): 2.0,
    ("vmamba2d_tiny", "training", "compiled"): 2.5,
    ("vmamba2d_tiny", "inference", "compiled"): 3.0,
    ("vmamba_tiny", "training", "eager"): 1.2,
}
#: Peak training memory ratio to upstream aimed at (activation checkpointing off).
MEMORY_TARGET = 0.8
VARIANTS = ("eager", "compiled", "compiled+graph", "eager+ckpt", "eager+graph")
#: torch.compile's mode of each compiled variant.
COMPILE_MODES = {"compiled": None, "compiled+graph": "reduce-overhead"}


def build(name: str, variant: str) -> torch.nn.Module:
    """A randomly initialised model (speed does not depend on the weights) prepared for one variant.

    Args:
        name: timm model name.
        variant: One of VARIANTS.
    """
    import timm

    import mamba2d.zoo  # noqa: F401  (registers the backbones with timm)

    model = timm.create_model(name)
    if variant == "eager+ckpt":
        model.set_grad_checkpointing(True)
    return model


def row(m: Measurement, variant: str) -> dict:
    """One table row: our measurement beside the upstream anchor at the same precision and the target ratios.

    Args:
        m: Our measurement.
        variant: One of VARIANTS.
    """
    anchor = UPSTREAM.get((m.model, m.mode, m.precision))
    out = {**asdict(m), "variant": variant, "upstream": None, "upstream_images_per_s": None, "ratio": None,
           "target_ratio": SPEED_TARGET.get((m.model, m.mode, "compiled" if variant in COMPILE_MODES else variant))
           if anchor else None,
           "upstream_peak_gb": None, "memory_ratio": None}
    if anchor:
        out.update(upstream=anchor[0], upstream_images_per_s=anchor[1], ratio=m.images_per_s / anchor[1])
        if anchor[2] is not None and variant != "eager+ckpt":
            out.update(upstream_peak_gb=anchor[2], memory_ratio=m.peak_memory_gb / anchor[2])
    return out


def markdown(rows: list[dict], device: str) -> str:
    """The rows as one markdown table (images/s; GB = 10^9 bytes), the device and the precisions named.

    Args:
        rows: Output of `row`.
        device: The card's name.
    """

    def ratio(value, target, at_most=False):
        if value is None:
            return "—"
        if target is None:
            return f"{value:.2f}x"
        met = value <= target if at_most else value >= target
        return f"{value:.2f}x ({'meets' if met else 'misses'} {'≤' if at_most else '≥'}{target}x)"

    lines = [f"{device}; batch {rows[0]['batch'] if rows else '-'} at {rows[0]['size'] if rows else '-'}²; "
             "fp32 = float32 (TF32 on), fp16 / bf16 = float16 / bfloat16 autocast; images/s; GB = 10^9 bytes",
             "",
             "| model | mode | variant | precision | ours img/s | upstream img/s | ours / upstream (target) "
             "| peak GB ours / upstream (target ≤0.8x) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        upstream = f"{r['upstream']} {r['upstream_images_per_s']:.0f}" if r["upstream"] else "—"
        memory = f"{r['peak_memory_gb']:.2f}"
        if r["upstream_peak_gb"] is not None:
            memory += f" / {r['upstream_peak_gb']:.2f}: {ratio(r['memory_ratio'], MEMORY_TARGET, at_most=True)}"
        lines.append(f"| {r['model']} | {r['mode']} | {r['variant']} | {r['precision']} | {r['images_per_s']:.0f} "
                     f"| {upstream} | {ratio(r['ratio'], r['target_ratio'])} | {memory} |")
    return "\n".join(lines)


def measure_config(name: str, variant: str, mode: str, precision: str, args: argparse.Namespace,
                   device: torch.device) -> dict:
    """Our table row of one configuration, measured in this process.

    Args:
        name: timm model name.
        variant: One of VARIANTS.
        mode: "training" or "inference".
        precision: One of PRECISIONS.
        args: The parsed command line (batch, size, warmup, iters).
        device: Where to run.
    """
    allow_tf32()
    model = build(name, variant)
    runner = torch.compile(model, mode=COMPILE_MODES[variant]) if variant in COMPILE_MODES else model
    with scan_tuning.models_use_env():
        m = measure(runner, name, mode, precision, args.batch, args.size, device, args.warmup, args.iters,
                    cuda_graph=variant == "eager+graph")
    print(f"{name} {variant} {mode} {precision}: {m.images_per_s:.1f} images/s, peak {m.peak_memory_gb:.2f} GB "
          f"({m.memory_kind})", flush=True)
    return row(m, variant)


def measure_apart(config: tuple[str, str, str, str], args: argparse.Namespace) -> dict:
    """The row of one configuration measured by this script in a fresh process (see the module's docstring).

    Args:
        config: (model, variant, mode, precision).
        args: The parsed command line, passed on.
    """
    name, variant, mode, precision = config
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "row.json"
        subprocess.run([sys.executable, __file__, "--models", name, "--variants", variant, "--modes", mode,
                        "--precisions", precision, *(f"--{key}={getattr(args, key)}" for key in
                                                     ("batch", "size", "warmup", "iters", "device")),
                        "--json", str(out), "--row-only"], check=True)
        return json.loads(out.read_text())["rows"][0]


def main(argv: list[str] | None = None) -> int:
    """Measure every (model, variant, mode, precision), print the table and optionally write it as JSON.

    Args:
        argv: Command-line arguments (default: sys.argv[1:]).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vmamba2d_tiny", "vmamba_tiny"])
    parser.add_argument("--variants", nargs="+", default=["eager"], choices=VARIANTS)
    parser.add_argument("--modes", nargs="+", default=["training", "inference"], choices=["training", "inference"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "bf16"], choices=list(PRECISIONS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--row-only", action="store_true", help=argparse.SUPPRESS)  # a child of measure_apart
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    configs = [(name, variant, mode, precision) for name in args.models for variant in args.variants
               for mode in args.modes for precision in args.precisions
               if not (variant in ("eager+ckpt", "eager+graph") and mode == "inference")]
    if len(configs) == 1:
        rows = [measure_config(*configs[0], args, device)]
    else:
        rows = [measure_apart(config, args) for config in configs]
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if os.environ.get(scan_tuning.ENV):
        label += f"; scan tuning {scan_tuning.ENV}={os.environ[scan_tuning.ENV]}"
    if not args.row_only:
        print(markdown(rows, label))
    if args.json:
        args.json.write_text(json.dumps({"device": label, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
