#!/usr/bin/env python
"""Token-mixer scaling: latency and peak memory of one mixer over square maps from 32² to 2048² pixels.

Three mixers over the same tokens (batch `--batch`, C = `--dim` channels, side s): *2d*, 2DVMamba's mixer
(`mamba2d.models.vmamba.SS2D` with `scan="2d"`, on the (batch, s, s, C) rows of a map, as VSSM's blocks feed it);
*1d*, VMamba's mixer (the same SS2D with `scan="cross1d"`); *sdpa*, attention over the s*s tokens (qkv Linear,
`torch.nn.functional.scaled_dot_product_attention` with `--heads` heads and PyTorch's choice of backend, out Linear)
on a (batch, s*s, C) sequence. SS2D's scan backend is "auto": the CUDA kernels on a GPU, the reference on CPU.

Passes: *fwd* (under `torch.inference_mode`) and *fwd+bwd* (backward of `out.float().sum()` into the weights and
the input, gradients fresh each rep). Modules are float32; bf16 / fp16 run them under `torch.autocast`. Latency is
the median wall time of one call synchronised before and after (host launch time included: small maps are
launch-bound, which is what this shows), over `--reps` reps after `--warmup` warm-up calls; a measurement whose calls
are slow stops early, after at least 3 timed reps (or `--reps` if fewer), once it has spent `--max-seconds`, and its
warm-up likewise after 2 calls (the first compiles and allocates). Peak memory is `torch.cuda.max_memory_allocated`
over the timed reps (weights and input included) in GB = 10^9 bytes; CPU has no per-call peak, so none is given.
Attention's cost grows with the square of the pixels: sides above `--sdpa-max-side` are recorded as skipped, and a
size that runs out of GPU memory is recorded as OOM. The scaling columns compare each size with the previous one of
the same mixer and pass. With `--cuda-graph` (CUDA only) each measurement's call is captured once as a CUDA graph
(after warm-up calls on a side stream, autocast's cast cache off) and the graph's replay is timed: one launch per
call, so the times are the kernels' pace without the host's, for every mixer alike. The model-speed targets checked
at the end: 2d time at 1024² / 512² at most 4.2 (fwd and fwd+bwd), and 2d time / sdpa time at most 1.0 at 32², 64²
and 128².

    python tools/bench_token_mixer.py [--sizes 32 64 128 256 512 1024 2048] [--precision bf16] [--dim 128]
        [--batch 1] [--heads 4] [--device auto] [--json out.json] [--figure out.png]
    python tools/bench_token_mixer.py --sizes 32 64 128 --cuda-graph
    python tools/bench_token_mixer.py --device cpu --sizes 8 16 --reps 2 --warmup 1

`MAMBA2D_SCAN_TUNE` (`tools/scan_tuning.py`) runs the mixers' CUDA scans with other launch parameters, for A/B runs
(e.g. `MAMBA2D_SCAN_TUNE=WIDEK=2`: two columns per thread on maps wider than 128 instead of four);
unset, the mixers call the public op as models do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scan_tuning  # noqa: E402

from mamba2d.analysis.throughput import PRECISIONS  # noqa: E402
from mamba2d.models.vmamba import SS2D  # noqa: E402

MIXERS = ("2d", "1d", "sdpa")
PASSES = ("fwd", "fwd+bwd")
#: What each precision means here, for the table's header and the figure's title.
PRECISION_TEXT = {"fp32": "fp32 = float32 modules, no autocast",
                  "bf16": "bf16 = bfloat16 autocast over float32 modules",
                  "fp16": "fp16 = float16 autocast over float32 modules"}
#: Upper bound on 2d time at 1024² over 2d time at 512² (four times the pixels).
TARGET_2D_SCALING = 4.2
#: Upper bound on 2d time over sdpa time at the small maps, and those maps' sides.
TARGET_2D_VS_SDPA = 1.0
SMALL_SIDES = (32, 64, 128)


class Attention(nn.Module):
    """Multi-head self-attention over a token sequence: qkv Linear, SDPA, out Linear.

    Args:
        dim: Channels in and out.
        heads: Attention heads; must divide `dim`.

    Raises:
        ValueError: `heads` does not divide `dim`.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: --heads {heads} must divide --dim {dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def build_mixer(name: str, dim: int, heads: int) -> nn.Module:
    """A randomly initialised float32 mixer (its speed does not depend on the weights).

    Args:
        name: One of MIXERS.
        dim: Channels.
        heads: Attention heads of "sdpa".
    """
    if name == "sdpa":
        return Attention(dim, heads)
    return SS2D(d_model=dim, scan="2d" if name == "2d" else "cross1d")


def make_input(name: str, batch: int, dim: int, side: int, device: torch.device) -> torch.Tensor:
    """The float32 tokens mixer `name` reads: a map's (batch, side, side, dim) rows for SS2D, a sequence for
    attention.

    Args:
        name: One of MIXERS.
        batch: Images.
        dim: Channels.
        side: Map side in pixels.
        device: Where the tensor lives.
    """
    if name == "sdpa":
        return torch.randn(batch, side * side, dim, device=device)
    # VSSM keeps its residual stream channels_last, so its blocks' mixers always see contiguous rows.
    return torch.randn(batch, side, side, dim, device=device)


def time_calls(fn, device: torch.device, warmup: int, reps: int, max_seconds: float) -> list[float]:
    """Wall milliseconds of synchronised calls of `fn`, after the warm-up, each call timed alone.

    Args:
        fn: The call to time.
        device: Synchronised around every call when CUDA.
        warmup: Most untimed calls first; they stop after 2 (or `warmup` if fewer) once they spent `max_seconds`.
        reps: Most timed calls; they stop after 3 (or `reps` if fewer) once they spent `max_seconds`.
        max_seconds: Time after which warm-up and timed calls stop early.
    """

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(count: int, least: int) -> list[float]:
        times: list[float] = []
        for _ in range(count):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
            if len(times) >= least and sum(times) > max_seconds * 1e3:
                break
        return times

    run(warmup, min(warmup, 2))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return run(reps, min(reps, 3))


def captured(fn, device: torch.device):
    """The replay of `fn` captured as one CUDA graph, after three warm-up calls on a side stream (capture needs its
    kernels compiled and its memory pool warm).

    Args:
        fn: The call to capture; every tensor it reads must stay where it is (the graph replays on the same memory).
        device: The CUDA device.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(name: str, module: nn.Module, side: int, pass_name: str, args: argparse.Namespace,
            device: torch.device) -> dict:
    """One (mixer, size, pass) record: median ms, peak GB and the reps timed; OOM recorded, not raised.

    Args:
        name: One of MIXERS.
        module: The mixer, on `device`.
        side: Map side in pixels.
        pass_name: One of PASSES.
        args: The parsed command line (batch, dim, precision, warmup, reps, max_seconds, cuda_graph).
        device: Where the mixer runs.
    """
    record = {"mixer": name, "pass": pass_name, "side": side, "pixels": side * side, "status": "ok", "ms": None,
              "peak_gb": None, "reps": 0}
    if name == "sdpa" and side > args.sdpa_max_side:
        record["status"] = "skipped"
        return record
    dtype = PRECISIONS[args.precision]

    def autocast():
        # a captured call must cast its weights inside the graph: no cast cached across calls
        return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype,
                                                                  cache_enabled=not args.cuda_graph)

    try:
        x = make_input(name, args.batch, args.dim, side, device)
        if pass_name == "fwd":
            def step():
                with torch.inference_mode(), autocast():
                    module(x)
        else:
            x.requires_grad_(True)

            def step():
                # Fresh gradients each rep, as a training step's zero_grad(set_to_none=True): accumulating into the
                # last rep's would add read-modify-writes that are the benchmark's, not the mixer's.
                x.grad = None
                module.zero_grad(set_to_none=True)
                with autocast():
                    out = module(x)
                out.float().sum().backward()

        times = time_calls(captured(step, device) if args.cuda_graph else step, device, args.warmup, args.reps,
                           args.max_seconds)
        record.update(ms=statistics.median(times), reps=len(times))
        if device.type == "cuda":
            record["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    except torch.OutOfMemoryError:
        record["status"] = "OOM"
    return record


def add_scaling(records: list[dict]) -> None:
    """Give each record the ratios of its time and pixels to the previous size of the same mixer and pass.

    Args:
        records: In the order measured (sizes ascending within each mixer and pass); updated in place with
            `time_ratio` (None where either time is missing) and `pixel_ratio` (None for a first size).
    """
    previous: dict[tuple[str, str], dict] = {}
    for r in records:
        before = previous.get((r["mixer"], r["pass"]))
        r["pixel_ratio"] = r["pixels"] / before["pixels"] if before else None
        r["time_ratio"] = r["ms"] / before["ms"] if before and r["ms"] and before["ms"] else None
        previous[(r["mixer"], r["pass"])] = r


def targets(records: list[dict]) -> list[dict]:
    """The model-speed checks: 2d time 1024² / 512² (both passes) and 2d / sdpa time at SMALL_SIDES.

    Args:
        records: Measurement records (mixer, pass, side, ms).

    Returns:
        One dict per check: `check` (what is compared), `value` (the ratio, None where a time is missing), `target`
        (its upper bound) and `met` (None where not measured).
    """
    ms = {(r["mixer"], r["pass"], r["side"]): r["ms"] for r in records}

    def check(text: str, numerator, denominator, bound: float) -> dict:
        top, bottom = ms.get(numerator), ms.get(denominator)
        value = top / bottom if top and bottom else None
        return {"check": text, "value": value, "target": bound, "met": None if value is None else value <= bound}

    out = [check(f"2d {p} time 1024² / 512²", ("2d", p, 1024), ("2d", p, 512), TARGET_2D_SCALING) for p in PASSES]
    out += [check(f"2d / sdpa {p} time at {s}²", ("2d", p, s), ("sdpa", p, s), TARGET_2D_VS_SDPA)
            for s in SMALL_SIDES for p in PASSES]
    return out


def markdown(records: list[dict], checks: list[dict], header: str) -> str:
    """The records as one markdown table, then the target checks as another.

    Args:
        records: Measurement records with their scaling ratios (`add_scaling`).
        checks: Output of `targets`.
        header: First line: device, precision, batch, channels and units.
    """

    def number(value, fmt):
        return "—" if value is None else format(value, fmt)

    lines = [header, "", "| mixer | pass | side | pixels | ms | × time vs previous size | × pixels | peak GB | reps |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        ms = number(r["ms"], ".3f") if r["status"] == "ok" else r["status"]
        lines.append(f"| {r['mixer']} | {r['pass']} | {r['side']}² | {r['pixels']} | {ms} "
                     f"| {number(r['time_ratio'], '.2f')} | {number(r['pixel_ratio'], '.0f')} "
                     f"| {number(r['peak_gb'], '.3f')} | {r['reps']} |")
    lines += ["", "| model-speed check | value | target | verdict |", "| --- | ---: | ---: | --- |"]
    for c in checks:
        verdict = "not measured" if c["met"] is None else "meets" if c["met"] else "misses"
        lines.append(f"| {c['check']} | {number(c['value'], '.2f')} | ≤ {c['target']} | {verdict} |")
    return "\n".join(lines)


def figure(records: list[dict], title: str, path: Path) -> None:
    """Save latency and peak memory against pixels (log-log), one line per mixer and pass, beside a dashed line of
    linear scaling through the largest measured 2d point.

    Args:
        records: Measurement records.
        title: The figure's title (device and precision).
        path: Where the PNG goes.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    panels = fig.subplots(1, 2)
    colours = dict(zip(MIXERS, ("tab:blue", "tab:orange", "tab:green")))
    styles = {"fwd": ":", "fwd+bwd": "-"}
    for ax, key, label in ((panels[0], "ms", "latency (ms)"), (panels[1], "peak_gb", "peak memory (GB = 10^9 B)")):
        drawn = False
        for mixer in MIXERS:
            for pass_name in PASSES:
                points = [(r["pixels"], r[key]) for r in records
                          if r["mixer"] == mixer and r["pass"] == pass_name and r[key] is not None]
                if points:
                    ax.plot(*zip(*points), styles[pass_name], marker="o", markersize=3, color=colours[mixer],
                            label=f"{mixer} {pass_name}")
                    drawn = True
        # The reference passes through 2d's largest map, where its cost is no longer launch overhead.
        anchor = [r for r in records if r["mixer"] == "2d" and r[key] is not None]
        if anchor:
            last = max(anchor, key=lambda r: (r["pixels"], r["pass"] == "fwd+bwd"))
            pixels = sorted({r["pixels"] for r in records})
            ax.plot(pixels, [last[key] * p / last["pixels"] for p in pixels], "--", color="grey", linewidth=1,
                    label=f"∝ pixels (through 2d {last['pass']})")
        if drawn:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no per-call peak memory on CPU", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("pixels (side²)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def resolve_device(name: str) -> torch.device:
    """The device `--device` names; "auto" is CUDA when there is one.

    Args:
        name: "auto", "cpu" or "cuda".

    Raises:
        SystemExit: CUDA asked for but not available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_token_mixer: --device cuda but no CUDA GPU is available")
    return torch.device(name)


def main(argv=None) -> int:
    """Measure every mixer at every size and pass, print the tables, optionally write the JSON and the figure.

    Args:
        argv: Command-line arguments (None: sys.argv).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 2048],
                        help="map sides in pixels, ascending")
    parser.add_argument("--mixers", nargs="+", choices=MIXERS, default=list(MIXERS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=128, help="channels C")
    parser.add_argument("--heads", type=int, default=4, help="attention heads of sdpa")
    parser.add_argument("--precision", choices=sorted(PRECISION_TEXT), default="bf16")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=2.0,
                        help="time after which a measurement's warm-up and timed reps stop early")
    parser.add_argument("--sdpa-max-side", type=int, default=512,
                        help="largest side sdpa runs at (its cost is quadratic in pixels); larger ones are skipped")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time each call's replay as a CUDA graph (the kernels' pace without the host's)")
    parser.add_argument("--json", type=Path, default=None, help="also write every record as JSON here")
    parser.add_argument("--figure", type=Path, default=None, help="also save the scaling figure (PNG) here")
    args = parser.parse_args(argv)
    if sorted(args.sizes) != args.sizes:
        parser.error(f"--sizes must be ascending (the scaling columns compare neighbours), got {args.sizes}")
    device = resolve_device(args.device)
    if args.cuda_graph and device.type != "cuda":
        parser.error("--cuda-graph needs a CUDA device")
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({torch.get_num_threads()} threads)")

    records = []
    tuned = os.environ.get(scan_tuning.ENV)
    with scan_tuning.models_use_env():
        for name in args.mixers:
            torch.manual_seed(0)
            module = build_mixer(name, args.dim, args.heads).to(device)
            for pass_name in PASSES:
                for side in args.sizes:
                    record = measure(name, module, side, pass_name, args, device)
                    if record["status"] == "OOM":
                        # The failed call's tensors went with measure's frame; hand their cached blocks back.
                        torch.cuda.empty_cache()
                    records.append(record)
                    print(json.dumps(record), file=sys.stderr, flush=True)
            # The next mixer's largest maps need the memory this one's cached blocks hold, in other block sizes.
            del module
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_scaling(records)
    checks = targets(records)
    header = (f"Token mixers on {device_name}; {PRECISION_TEXT[args.precision]}; batch {args.batch}, C = {args.dim}, "
              + (f"scan tuning {scan_tuning.ENV}={tuned}; " if tuned else "")
              + f"sdpa {args.heads} heads; ms = median wall milliseconds of a synchronised call "
              + ("(a CUDA graph's replay: one launch per call); " if args.cuda_graph else "(host time included); ")
              + "GB = 10^9 bytes (peak CUDA memory allocated; — on CPU)")
    print(markdown(records, checks, header))
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "precision": args.precision, "batch": args.batch,
                                         "dim": args.dim, "heads": args.heads, "cuda_graph": args.cuda_graph,
                                         "records": records,
                                         "targets": checks}, indent=1))
    if args.figure:
        figure(records, f"Token mixers, batch {args.batch}, C = {args.dim}: {device_name}, {args.precision}",
               args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
