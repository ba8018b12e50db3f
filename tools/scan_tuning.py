"""Scan-kernel tuning for the benchmarks: a `ScanTuning` from the MAMBA2D_SCAN_TUNE environment variable, and the
means to run a scan (or a model's scans) with it.

The library never reads the environment: it runs `mamba2d.ops.cuda_build.DEFAULT_TUNING` unless a caller passes
another `ScanTuning` to `mamba2d.ops.library.selective_scan_2d_cuda`. This module is where benchmarks and profilers
turn a spec such as ``MAMBA2D_SCAN_TUNE="R=4,FWD=3,BWD=2,KMAX=2"`` into one.

Keys (each ``KEY=VALUE``, comma-separated; see `ScanTuning` for what each knob does):
  R (rows_per_band), KMAX (max_cols_per_thread), LANES (row_lanes), FWD (fwd_min_blocks), BTHR (bwd_max_threads),
  FTHR (fwd_max_threads), SPLIT (split_target_blocks; 0: never split the states), WIDEK (wide_cols_per_thread),
  TW (tile_warps), PAIRS (narrow_pairs: 0 off, else on), VEC (vector_access: 0 off, else on), BWD (bwd_min_blocks), DBUF
  (reduction_buffers), BWDN (narrow_bwd_min_blocks), PF (prefetch_rows), LEAN (lean_pointers), WAVE (0: never the
  wavefront kernels, 1: on every shape whose tiles fit), WNS (wave_states_per_lane), WT (wave_steps), WCL
  (wave_cluster).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mamba2d.ops import cuda_build  # noqa: E402
from mamba2d.ops.cuda_build import DEFAULT_TUNING, ScanTuning  # noqa: E402

ENV = "MAMBA2D_SCAN_TUNE"

#: Spec key -> ScanTuning field of the integer knobs.
INT_KEYS = {
    "R": "rows_per_band", "KMAX": "max_cols_per_thread", "LANES": "row_lanes", "FWD": "fwd_min_blocks",
    "BTHR": "bwd_max_threads", "FTHR": "fwd_max_threads", "SPLIT": "split_target_blocks",
    "WIDEK": "wide_cols_per_thread", "BWD": "bwd_min_blocks", "DBUF": "reduction_buffers",
    "BWDN": "narrow_bwd_min_blocks", "PF": "prefetch_rows", "LEAN": "lean_pointers", "WNS": "wave_states_per_lane",
    "WT": "wave_steps", "WCL": "wave_cluster", "TW": "tile_warps",
}
#: Spec key -> ScanTuning field of the on/off knobs ("0": off, any other value: on).
FLAG_KEYS = {"PAIRS": "narrow_pairs", "VEC": "vector_access"}
KEYS = (*INT_KEYS, *FLAG_KEYS, "WAVE")


def parse(spec: str, source: str = ENV) -> ScanTuning:
    """The tuning a MAMBA2D_SCAN_TUNE spec asks for (the defaults for an empty spec).

    Args:
        spec: comma-separated ``KEY=VALUE`` items (module docstring).
        source: where the spec came from, for error messages.

    Raises:
        ValueError: an item without ``=``, an unknown key, a value that is not an integer, or WAVE other than 0/1.
    """
    changes: dict[str, object] = {}
    for item in spec.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"{source}: item {item!r} is not KEY=VALUE")
        if key not in KEYS:
            raise ValueError(f"{source}: unknown key {key!r}; known keys: {', '.join(KEYS)}")
        value = value.strip()
        if key in FLAG_KEYS:
            changes[FLAG_KEYS[key]] = value != "0"
        elif key == "WAVE":
            if value not in ("0", "1"):
                raise ValueError(f"{source}: WAVE must be 0 (never the wavefront kernels) or 1 (wherever they fit), "
                                 f"got {value!r}")
            if value == "0":
                changes["wave_min_states"] = cuda_build.MAX_D_STATE + 1
            else:
                changes["force_wavefront"] = True
        else:
            try:
                changes[INT_KEYS[key]] = int(value)
            except ValueError:
                raise ValueError(f"{source}: {key} must be an integer, got {value!r}") from None
    return dataclasses.replace(DEFAULT_TUNING, **changes)


def from_env(environ: Mapping[str, str] = os.environ) -> ScanTuning:
    """The tuning MAMBA2D_SCAN_TUNE asks for in `environ` (the defaults where it is unset or empty)."""
    return parse(environ.get(ENV, ""))


def scan(tuning: ScanTuning):
    """`selective_scan_2d` that runs the CUDA kernels with `tuning` wherever backend "auto" or "cuda" would run them
    (same signature; backend "reference" and CPU tensors go to the public op unchanged)."""
    from mamba2d.ops import selective_scan_2d
    from mamba2d.ops.library import selective_scan_2d_cuda
    from mamba2d.ops.scan import cuda_backend_available

    def tuned(*args, backend: str = "auto", **kwargs):
        u = args[0] if args else kwargs["u"]
        if backend == "reference" or (backend == "auto" and not cuda_backend_available(u)):
            return selective_scan_2d(*args, backend=backend, **kwargs)
        return selective_scan_2d_cuda(*args, **kwargs, tuning=tuning)

    return functools.update_wrapper(tuned, selective_scan_2d)


@contextlib.contextmanager
def models_use(tuning: ScanTuning) -> Iterator[None]:
    """Inside the block, the scan layers of mamba2d's models (VMamba2D, 2DMambaMIL) call the CUDA scan with
    `tuning` (a benchmark's A/B of whole models; the library itself has no switch for this)."""
    from mamba2d.models import mil_mamba, vmamba

    saved = [(module, module.selective_scan_2d) for module in (vmamba, mil_mamba)]
    try:
        for module, _ in saved:
            module.selective_scan_2d = scan(tuning)
        yield
    finally:
        for module, original in saved:
            module.selective_scan_2d = original


def models_use_env(environ: Mapping[str, str] = os.environ) -> contextlib.AbstractContextManager:
    """`models_use(from_env(environ))` where MAMBA2D_SCAN_TUNE is set; where it is not, a block in which the models
    call the public op as they always do."""
    return models_use(from_env(environ)) if environ.get(ENV) else contextlib.nullcontext()
