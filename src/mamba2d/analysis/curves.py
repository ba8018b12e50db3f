"""Training curves of a run directory: Lightning's CSVLogger `metrics.csv` to PNGs (loss, learning rate, each
validation metric), drawn with matplotlib's Figure API."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from matplotlib.figure import Figure


def find_metrics(run_dir: str | Path) -> Path:
    """The `metrics.csv` of a run: `run_dir/metrics.csv`, else the most recent one below `run_dir`.

    Args:
        run_dir: A CSVLogger version folder, or a folder above it (e.g. runs/mamba2d).

    Raises:
        FileNotFoundError: No metrics.csv under `run_dir` (names the folder).
    """
    run_dir = Path(run_dir)
    if (run_dir / "metrics.csv").is_file():
        return run_dir / "metrics.csv"
    found = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"curves: no metrics.csv in {run_dir} or below (a CSVLogger run directory)")
    return found[-1]


def read_metrics(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Each logged column as (step, value) points, empty cells skipped.

    Args:
        path: A CSVLogger `metrics.csv`.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    with Path(path).open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = float(row.get("step") or "nan")
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                if not math.isnan(step) and not math.isnan(number):
                    series.setdefault(key, []).append((step, number))
    return series


def _plot(panels: dict[str, list[tuple[float, float]]], title: str, ylabel: str) -> Figure:
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for key, points in panels.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_")


def plot_curves(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write training-curve PNGs of a run: `loss.png` (every loss column), `lr.png` (learning rates) and one
    `<metric>.png` per other validation metric, into `out_dir` (default: `<run>/curves`).

    Args:
        run_dir: A run directory with a CSVLogger `metrics.csv` (or a folder above; the latest run is used).
        out_dir: Folder of the PNGs.

    Returns:
        The PNGs written.

    Raises:
        FileNotFoundError: No metrics.csv.
        ValueError: The metrics.csv has no numeric column (names the file).
    """
    metrics = find_metrics(run_dir)
    series = read_metrics(metrics)
    if not series:
        raise ValueError(f"curves: {metrics} has no logged values")
    out = Path(out_dir) if out_dir is not None else metrics.parent / "curves"
    out.mkdir(parents=True, exist_ok=True)
    name = f"{metrics.parent.parent.name}/{metrics.parent.name}"
    losses = {k: v for k, v in series.items() if "loss" in k.lower()}
    rates = {k: v for k, v in series.items() if k.lower().startswith("lr") or "/lr" in k.lower()}
    written = []
    if losses:
        written.append(out / "loss.png")
        _plot(losses, f"{name}: loss", "loss").savefig(written[-1], dpi=110)
    if rates:
        written.append(out / "lr.png")
        _plot(rates, f"{name}: learning rate", "learning rate").savefig(written[-1], dpi=110)
    for key, points in series.items():
        if key.lower().startswith("val") and key not in losses:
            written.append(out / f"{_slug(key)}.png")
            _plot({key: points}, f"{name}: {key}", key).savefig(written[-1], dpi=110)
    for path in written:
        print(path)
    return written
