"""`mamba2d wsi`: the whole-slide pipeline from the command line (extract, heatmap, splits, benchmark).

Each subcommand's options are the parameters of the library functions it calls (`mamba2d.wsi.extract`,
`mamba2d.wsi.heatmap`, `mamba2d.wsi.spatial_benchmark`), so a new parameter there is a new option here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from jsonargparse import Namespace

from ..data.spatial_bags import BENCHMARK_BAGS, BENCHMARK_SPLITS, SpatialBagConfig
from ..data.splits import make_kfold_splits, read_csv_rows, write_split_file
from ..wsi.extract import extract_features
from ..wsi.heatmap import model_scores, render_heatmap
from ..wsi.spatial_benchmark import (
    BENCHMARK_MODELS,
    format_sweep_table,
    format_table,
    plot_benchmark,
    plot_example_bags,
    plot_sweep,
    run_spatial_benchmark,
    run_spatial_sweep,
)
from .commands import Command, call, function_command, group_command

__all__ = ["benchmark", "command", "sweep", "write_kfold_splits"]


def _extract(keys: Namespace) -> int:
    for summary in call(extract_features, keys):
        if summary.get("skipped"):
            print(f"{summary['slide']}: {summary['h5']} exists, skipped (--overwrite true to redo)")
        else:
            print(f"{summary['slide']}: {summary['patches']} patches -> {summary['h5']} ({summary['seconds']:.1f} s)")
    return 0


def _heatmap(keys: Namespace) -> int:
    coords, scores, stride, logits = call(model_scores, keys)
    out = call(render_heatmap, keys, coords=coords, scores=scores, patch_size_level0=stride)
    print(f"{out}: {len(scores)} patches, bag logits {np.round(logits.numpy(), 4).tolist()}")
    return 0


def write_kfold_splits(csv: Path, out: Path, folds: int = 5, task: str = "classification", label_column: str = "label",
                       val_fraction: float = 0.15, seed: int = 0) -> list[Path]:
    """Write stratified k-fold `splits_{k}.csv` (train/val/test) from a labels CSV; a case never straddles splits.

    Args:
        csv: Labels CSV with slide_id (and case_id when cases have several slides) and the label, or censorship
            for survival.
        out: Folder of the split files.
        folds: Number of folds.
        task: "classification" (stratified by `label_column`) or "survival" (stratified by censorship).
        label_column: The class column for classification.
        val_fraction: Share of each fold's training cases held out for validation.
        seed: Seed of the shuffling.

    Returns:
        The split files written.
    """
    if task not in ("classification", "survival"):
        raise ValueError(f"wsi splits: task must be 'classification' or 'survival', got {task!r}")
    column = label_column if task == "classification" else "censorship"
    rows = read_csv_rows(csv, ["slide_id", column])
    id_column = "case_id" if "case_id" in rows[0] else "slide_id"
    strata = {row[id_column]: row[column] for row in rows}
    ids = list(strata)
    splits = make_kfold_splits(ids, [strata[i] for i in ids], folds, val_fraction, seed)
    if id_column == "case_id" and task == "classification":
        # Classification splits list slides: expand each case to its slides.
        slides_of: dict[str, list[str]] = {}
        for row in rows:
            slides_of.setdefault(row["case_id"], []).append(row["slide_id"])
        splits = [{name: [s for case in cases for s in slides_of[case]] for name, cases in fold.items()}
                  for fold in splits]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, fold in enumerate(splits):
        paths.append(out / f"splits_{k}.csv")
        write_split_file(paths[-1], fold)
    print(f"wrote {folds} folds ({id_column}s, stratified by {column}) to {out}")
    return paths


def benchmark(models: Sequence[str] = tuple(BENCHMARK_MODELS), seeds: Sequence[int] = (0, 1, 2),
              train: int = BENCHMARK_SPLITS["train"], val: int = BENCHMARK_SPLITS["val"],
              test: int = BENCHMARK_SPLITS["test"], epochs: int | None = None, lr: float | None = None,
              bags: SpatialBagConfig = BENCHMARK_BAGS, threads: int = 1, work_dir: Path | None = None,
              out: Path | None = None) -> list[dict]:
    """Spatial MIL benchmark: every model on synthetic compact-vs-scattered bags, mean ± std over seeds.

    Args:
        models: Names of `mamba2d.models.mil.MIL_MODELS`.
        seeds: Seeds of bags, weights and data order.
        train: Training bags per seed.
        val: Validation bags (model selection on AUROC).
        test: Test bags (the reported metrics).
        epochs: Training epochs of every fit; default: each model's benchmark setting (12; `BENCHMARK_TRAINING` in
            `mamba2d.wsi.spatial_benchmark` lists the models tuned otherwise).
        lr: Learning rate of every fit; default: each model's benchmark setting (1e-3 unless tuned otherwise).
        bags: Bag geometry and signal (`mamba2d.data.spatial_bags.SpatialBagConfig`).
        threads: torch CPU threads (on bags this small, threading costs more than it gains).
        work_dir: Keep bags and checkpoints there (default: a temporary folder).
        out: Write benchmark.json, benchmark.md, benchmark.png (AUROC per model and seed) and examples.png
            (example bags of each class) there.

    Returns:
        One row per (model, seed): model, seed, acc, auroc.
    """
    torch.set_num_threads(threads)
    rows = run_spatial_benchmark(list(models), list(seeds), train, val, test, epochs, lr, bags, work_dir)
    for row in rows:
        print(f"{row['model']} seed {row['seed']}: acc {row['acc']:.3f} auroc {row['auroc']:.3f}")
    table = format_table(rows, bags)
    print(table)
    if out is not None:
        _write_report(Path(out), "benchmark", rows, table, plot_benchmark(rows), bags)
    return rows


def _write_report(out: Path, name: str, rows: list[dict], table: str, figure, bags: SpatialBagConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{name}.md").write_text(table + "\n")
    figure.savefig(out / f"{name}.png", dpi=110)
    plot_example_bags(bags).savefig(out / "examples.png", dpi=110)
    print(f"wrote {name}.json, {name}.md, {name}.png and examples.png to {out}")


def sweep(out: Path, models: Sequence[str] = tuple(BENCHMARK_MODELS), seeds: Sequence[int] = (0, 1, 2),
          amplitudes: Sequence[float] = (1.0, 2.0, 3.0), train_sizes: Sequence[int] = (32, BENCHMARK_SPLITS["train"]),
          val: int = BENCHMARK_SPLITS["val"], test: int = BENCHMARK_SPLITS["test"], epochs: int | None = None,
          lr: float | None = None, bags: SpatialBagConfig = BENCHMARK_BAGS, threads: int = 1,
          work_dir: Path | None = None) -> list[dict]:
    """Spatial MIL sweep: the benchmark at every per-patch signal strength and training-set size, so the point
    where each model stops learning is visible. Writes sweep.json, sweep.md (mean ± std AUROC per point),
    sweep.png (AUROC curves with seeds) and examples.png.

    Args:
        out: Folder of the report.
        models: Names of `mamba2d.models.mil.MIL_MODELS`.
        seeds: Seeds of bags, weights and data order.
        amplitudes: Signal strengths of a positive patch.
        train_sizes: Numbers of training bags.
        val: Validation bags (model selection on AUROC).
        test: Test bags (the reported metrics).
        epochs: Training epochs of every fit; default: each model's benchmark setting (12; `BENCHMARK_TRAINING` in
            `mamba2d.wsi.spatial_benchmark` lists the models tuned otherwise).
        lr: Learning rate of every fit; default: each model's benchmark setting (1e-3 unless tuned otherwise).
        bags: Bag geometry (its amplitude is swept).
        threads: torch CPU threads.
        work_dir: Keep bags and checkpoints there (default: a temporary folder).

    Returns:
        One row per fit: model, seed, amplitude, n_train, acc, auroc.
    """
    torch.set_num_threads(threads)
    rows = run_spatial_sweep(list(models), list(seeds), list(amplitudes), list(train_sizes), val, test, epochs, lr,
                             bags, work_dir)
    table = format_sweep_table(rows)
    print(table)
    _write_report(Path(out), "sweep", rows, table, plot_sweep(rows), bags)
    return rows


def command() -> Command:
    """The `mamba2d wsi` command group."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return group_command("The whole-slide pipeline: slides to feature bags, heatmaps, k-fold splits, benchmark.", {
        "extract": function_command(extract_features, run=_extract, positional=False),
        "heatmap": function_command(model_scores, render_heatmap, skip=("coords", "scores", "patch_size_level0"),
                                    run=_heatmap, positional=False,
                                    description="Overlay a trained model's per-patch scores on the slide thumbnail "
                                    "(PNG)."),
        "splits": function_command(write_kfold_splits, positional=False),
        "benchmark": function_command(benchmark),
        "sweep": function_command(sweep),
    })
