"""Summary of a k-fold run: mean ± std per metric over folds, as a CSV, a markdown table and a figure."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def summarise(results: Mapping[str, Sequence[float]]) -> list[dict]:
    """One row per metric: metric, mean, std (population, over folds), folds, per_fold.

    Args:
        results: Metric name -> one value per fold.
    """
    rows = []
    for key in sorted(results):
        values = np.asarray(results[key], dtype=np.float64)
        rows.append({"metric": key, "mean": float(values.mean()), "std": float(values.std()), "folds": len(values),
                     "per_fold": [float(v) for v in values]})
    return rows


def format_table(results: Mapping[str, Sequence[float]]) -> str:
    """Markdown table: metric | mean ± std | per fold.

    Args:
        results: Metric name -> one value per fold.
    """
    lines = ["| metric | mean ± std | per fold |", "|---|---|---|"]
    for row in summarise(results):
        lines.append(f"| {row['metric']} | {row['mean']:.4f} ± {row['std']:.4f} | "
                     + ", ".join(f"{v:.4f}" for v in row["per_fold"]) + " |")
    return "\n".join(lines)


def plot_summary(results: Mapping[str, Sequence[float]], title: str = "") -> Figure:
    """Bar per metric at its mean with a ± std error bar, each fold's value a dot (matplotlib Figure API).

    Args:
        results: Metric name -> one value per fold.
        title: Figure title.
    """
    rows = summarise(results)
    fig = Figure(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    ax.bar(x, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color="#9ecae1",
           edgecolor="#3182bd", label="mean ± std")
    for i, row in enumerate(rows):
        ax.scatter(np.full(row["folds"], i) + np.linspace(-0.15, 0.15, row["folds"]), row["per_fold"], s=14,
                   color="#08306b", zorder=3, label="fold" if i == 0 else None)
    ax.set_xticks(x, [r["metric"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("value")
    ax.legend(fontsize=8)
    ax.set_title(title or f"k-fold summary ({rows[0]['folds'] if rows else 0} folds)", fontsize=9)
    return fig


def write_summary(results: Mapping[str, Sequence[float]], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """Write `kfold_summary.csv` (metric, mean, std, folds, per fold) and `kfold_summary.png` into `out_dir`.

    Args:
        results: Metric name -> one value per fold.
        out_dir: Folder to write into (made if missing).
        title: Figure title.

    Returns:
        (CSV path, PNG path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(results)
    table = out_dir / "kfold_summary.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "mean", "std", "folds", "per_fold"])
        for row in rows:
            writer.writerow([row["metric"], f"{row['mean']:.6g}", f"{row['std']:.6g}", row["folds"],
                             " ".join(f"{v:.6g}" for v in row["per_fold"])])
    figure = out_dir / "kfold_summary.png"
    plot_summary(results, title).savefig(figure, dpi=120)
    return table, figure
