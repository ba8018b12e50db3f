"""Spatial benchmark: every MIL model trained on synthetic bags whose label is the arrangement of positive patches
(compact region vs scattered, same count; `mamba2d.data.spatial_bags`). Each run generates its own bags from its
seed, trains with SlideMIL (model selection on val AUROC) and reports test accuracy and AUROC of the best
checkpoint. Permutation-invariant pooling (ABMIL, mean, max, TransMIL, which folds tokens in file order) sits at
chance by construction; models that read the coordinates (2DMambaMIL, MambaMIL in raster order, the grid CNN) can
solve it. `run_spatial_sweep` repeats this over per-patch signal strengths and training-set sizes, so the point
where each model stops learning is visible (`plot_sweep`).
"""

from __future__ import annotations

import csv
import logging
import tempfile
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from lightning.pytorch import Trainer, seed_everything
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from ..data.slides import SlideBagDataModule
from ..data.spatial_bags import (
    BENCHMARK_BAGS,
    BENCHMARK_EPOCHS,
    BENCHMARK_LR,
    SpatialBagConfig,
    make_bag,
    write_spatial_bags,
)
from ..tasks.checkpointing import BestCheckpoint, default_callbacks
from ..tasks.mil import SlideMIL

# Width 32 (2DMambaMIL: 64, tuned), so a CPU run takes minutes. The Mamba models run with gated attention pooling and
# Mamba's own initialisation: with upstream's tanh pooling and xavier initialisation they learn this task far less
# reliably (docs/wsi.md, "Spatial benchmark").
MAMBA_VARIANT = {"attention": "gated", "init": "mamba", "attn_dim": 32}
BENCHMARK_WEIGHT_DECAY = 1e-5
# Training settings that differ from the shared ones (BENCHMARK_LR, BENCHMARK_WEIGHT_DECAY, BENCHMARK_EPOCHS).
# 2DMambaMIL's (with its width and dropout above) were chosen on validation AUROC at the sweep's n=128 points
# (tools/tune_spatial_mil.py, docs/wsi.md); the other models keep the shared settings, untuned.
BENCHMARK_TRAINING: dict[str, dict] = {"mamba_mil_2d": {"lr": 3e-3}}
BENCHMARK_MODELS: dict[str, dict] = {
    "mamba_mil_2d": {"dim": 64, "dropout": 0.0, **MAMBA_VARIANT},
    "mamba_mil_1d": {"dim": 32, "num_layers": 1, **MAMBA_VARIANT},
    "abmil": {"dim": 32, "attn_dim": 32},
    "transmil": {"dim": 32, "heads": 4},
    "mean": {"dim": 32},
    "max": {"dim": 32},
    "grid_cnn": {"dim": 32, "attn_dim": 32},
}


def benchmark_training(model: str, lr: float | None = None, epochs: int | None = None) -> dict:
    """A model's training setting in the benchmark: the shared one, updated by its `BENCHMARK_TRAINING` entry.

    Args:
        model: A name of `BENCHMARK_MODELS`.
        lr: Replaces the learning rate when given.
        epochs: Replaces the number of epochs when given.

    Returns:
        lr, weight_decay and epochs.
    """
    setting = {"lr": BENCHMARK_LR, "weight_decay": BENCHMARK_WEIGHT_DECAY, "epochs": BENCHMARK_EPOCHS,
               **BENCHMARK_TRAINING.get(model, {})}
    return {**setting, **({"lr": lr} if lr is not None else {}), **({"epochs": epochs} if epochs is not None else {})}


def fit_and_test(model: str, data_dir: Path, seed: int, epochs: int, lr: float, work_dir: Path,
                 model_args: dict | None = None, feature_dim: int = 16,
                 csv_name: str = "labels.csv", weight_decay: float = BENCHMARK_WEIGHT_DECAY,
                 ) -> tuple[SlideMIL, dict[str, float]]:
    """Fit `model` on the train bags of `data_dir/csv_name`, select on val AUROC, test the selected checkpoint.

    Args:
        model: A name of `mamba2d.models.mil.MIL_MODELS`.
        data_dir: Folder of CLAM bags and their CSV (columns slide_id, label, split).
        seed: Seed of weights and data order.
        epochs: Training epochs.
        lr: AdamW learning rate.
        work_dir: Where the trainer writes its checkpoints.
        model_args: Model keyword arguments; default `BENCHMARK_MODELS[model]`.
        feature_dim: Feature size of the bags.
        csv_name: The labels CSV inside `data_dir`.
        weight_decay: AdamW weight decay (not on norms, biases and other 1-D parameters).

    Returns:
        The task holding the selected checkpoint's weights, and its test accuracy and AUROC (`acc`, `auroc`) with
        the validation AUROC that selected it (`val_auroc`).
    """
    seed_everything(seed, workers=True, verbose=False)
    data = SlideBagDataModule(str(data_dir), str(data_dir / csv_name))
    module = SlideMIL(model, in_dim=feature_dim, num_classes=2,
                      model_args=model_args if model_args is not None else BENCHMARK_MODELS[model],
                      lr=lr, weight_decay=weight_decay)
    callbacks = default_callbacks()
    best = next(c for c in callbacks if isinstance(c, BestCheckpoint))
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(work_dir),
                      callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, datamodule=data)
        (metrics,) = trainer.test(module, datamodule=data, ckpt_path="best", verbose=False)
    return module, {"acc": float(metrics["test/acc"]), "auroc": float(metrics["test/auroc"]),
                    "val_auroc": float(best.best_model_score)}


def run_spatial_benchmark(models: list[str], seeds: list[int], n_train: int, n_val: int, n_test: int,
                          epochs: int | None = None, lr: float | None = None, config: SpatialBagConfig | None = None,
                          work_dir: str | Path | None = None) -> list[dict]:
    """Fit and test every model on freshly generated spatial bags, once per seed.

    Each seed writes its own train/val/test bags (`write_spatial_bags`); every model is then fitted on them and
    tested with the checkpoint selected on validation (`fit_and_test`).

    Args:
        models: Names of `mamba2d.models.mil.MIL_MODELS` (with their `BENCHMARK_MODELS` arguments).
        seeds: Seeds of bags, weights and data order.
        n_train: Training bags.
        n_val: Validation bags (model selection).
        n_test: Test bags (the reported metrics).
        epochs: Training epochs of every fit; None: each model's (`benchmark_training`).
        lr: Learning rate of every fit; None: each model's (`benchmark_training`).
        config: Bag geometry and signal. Default `BENCHMARK_BAGS`.
        work_dir: Keep bags and checkpoints there (default: a temporary folder).

    Returns:
        One row per (model, seed): model, seed, acc, auroc.
    """
    config = config or BENCHMARK_BAGS
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_dir or tmp)
        for seed in seeds:
            data_dir = root / f"bags_seed{seed}"
            write_spatial_bags(data_dir, {"train": n_train, "val": n_val, "test": n_test}, seed=seed, config=config)
            for model in models:
                training = benchmark_training(model, lr, epochs)
                _, result = fit_and_test(model, data_dir, seed, training["epochs"], training["lr"],
                                         root / f"{model}_seed{seed}", feature_dim=config.feature_dim,
                                         weight_decay=training["weight_decay"])
                rows.append({"model": model, "seed": seed, **result})
                logging.getLogger(__name__).info("%s seed %d: %s", model, seed, result)
    return rows


def _write_sweep_bags(data_dir: Path, seed: int, config: SpatialBagConfig, train_sizes: list[int], n_val: int,
                      n_test: int) -> dict[int, str]:
    """Bags of one (seed, amplitude) with the largest training set, and one labels CSV per training-set size that
    keeps its first bags (balanced, as labels alternate) and the shared val and test bags; returns the CSV names."""
    labels = write_spatial_bags(data_dir, {"train": max(train_sizes), "val": n_val, "test": n_test}, seed=seed,
                                config=config)
    with labels.open() as handle:
        all_rows = list(csv.DictReader(handle))
    names = {}
    for n_train in train_sizes:
        names[n_train] = f"labels_train{n_train}.csv"
        with (data_dir / names[n_train]).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["slide_id", "label", "split"])
            writer.writeheader()
            writer.writerows(r for r in all_rows if r["split"] != "train" or int(r["slide_id"][-4:]) < n_train)
    return names


def run_spatial_sweep(models: list[str], seeds: list[int], amplitudes: list[float], train_sizes: list[int],
                      n_val: int, n_test: int, epochs: int | None = None, lr: float | None = None,
                      config: SpatialBagConfig | None = None, work_dir: str | Path | None = None,
                      progress: bool = True) -> list[dict]:
    """Every model at every (per-patch signal strength, number of training bags), for each seed.

    For one seed and amplitude the bags are generated once with the largest training set; smaller training sets
    are its first bags (balanced, as labels alternate), with the same validation and test bags, so the curves over
    training-set size differ only in what the model was shown.

    Args:
        models: Names of `mamba2d.models.mil.MIL_MODELS` (with their `BENCHMARK_MODELS` arguments).
        seeds: Seeds of bags, weights and data order.
        amplitudes: Signal strengths of the positive patches (`SpatialBagConfig.amplitude`).
        train_sizes: Numbers of training bags.
        n_val: Validation bags (model selection).
        n_test: Test bags (the reported metrics).
        epochs: Training epochs of every fit; None: each model's (`benchmark_training`).
        lr: Learning rate of every fit; None: each model's (`benchmark_training`).
        config: Bag geometry; its amplitude is replaced by each of `amplitudes`. Default `BENCHMARK_BAGS`.
        work_dir: Keep bags and checkpoints there (default: a temporary folder).
        progress: Show a progress bar over the fits.

    Returns:
        One row per fit: model, seed, amplitude, n_train, acc, auroc.
    """
    config = config or BENCHMARK_BAGS
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    rows = []
    total = len(seeds) * len(amplitudes) * len(train_sizes) * len(models)
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=total, desc="fits", disable=not progress) as bar:
        root = Path(work_dir or tmp)
        for seed in seeds:
            for amplitude in amplitudes:
                data_dir = root / f"bags_seed{seed}_amp{amplitude:g}"
                csv_names = _write_sweep_bags(data_dir, seed, replace(config, amplitude=amplitude), train_sizes,
                                              n_val, n_test)
                for n_train, csv_name in csv_names.items():
                    for model in models:
                        training = benchmark_training(model, lr, epochs)
                        _, result = fit_and_test(model, data_dir, seed, training["epochs"], training["lr"],
                                                 root / f"{model}_seed{seed}_amp{amplitude:g}_n{n_train}",
                                                 feature_dim=config.feature_dim, csv_name=csv_name,
                                                 weight_decay=training["weight_decay"])
                        rows.append({"model": model, "seed": seed, "amplitude": amplitude, "n_train": n_train,
                                     **result})
                        bar.update()
    return rows


def tune(settings: list[dict], points: list[tuple[int, float]], seeds: list[int], model: str = "mamba_mil_2d",
         n_val: int = 48, n_test: int = 128, config: SpatialBagConfig | None = None,
         work_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Fit one model with each training setting at sweep points, keeping the validation AUROC that selects and the
    test metrics beside it (choose with `select_setting`, which reads validation only).

    The bags are the sweep's (`run_spatial_sweep` with the same seeds and `n_val`, `n_test`, and the largest
    training set of `points` as its largest), so a setting's rows are the sweep's rows for it.

    Args:
        settings: Training settings, each with keys lr, weight_decay, epochs and model_args (the model's keyword
            arguments).
        points: (training bags, signal amplitude) pairs.
        seeds: Seeds of bags, weights and data order.
        model: A name of `mamba2d.models.mil.MIL_MODELS`.
        n_val: Validation bags (model selection and the tuning's score).
        n_test: Test bags (reported, never used to choose).
        config: Bag geometry; its amplitude is replaced by each point's. Default `BENCHMARK_BAGS`.
        work_dir: Keep bags and checkpoints there (default: a temporary folder).
        progress: Show a progress bar over the fits.

    Returns:
        One row per (setting, seed, point): setting (its index in `settings`), lr, weight_decay, epochs,
        model_args, seed, amplitude, n_train, val_auroc, acc, auroc.
    """
    config = config or BENCHMARK_BAGS
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    train_sizes = sorted({n for n, _ in points})
    rows = []
    total = len(settings) * len(seeds) * len(points)
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=total, desc="fits", disable=not progress) as bar:
        root = Path(work_dir or tmp)
        for seed in seeds:
            for amplitude in sorted({a for _, a in points}):
                data_dir = root / f"bags_seed{seed}_amp{amplitude:g}"
                csv_names = _write_sweep_bags(data_dir, seed, replace(config, amplitude=amplitude), train_sizes,
                                              n_val, n_test)
                for n_train in [n for n in train_sizes if (n, amplitude) in points]:
                    for index, setting in enumerate(settings):
                        _, result = fit_and_test(model, data_dir, seed, setting["epochs"], setting["lr"],
                                                 root / f"setting{index}_seed{seed}_amp{amplitude:g}_n{n_train}",
                                                 model_args=setting["model_args"], feature_dim=config.feature_dim,
                                                 csv_name=csv_names[n_train],
                                                 weight_decay=setting["weight_decay"])
                        rows.append({"setting": index, **setting, "seed": seed, "amplitude": amplitude,
                                     "n_train": n_train, **result})
                        bar.update()
    return rows


def select_setting(rows: list[dict]) -> int:
    """The setting with the highest validation AUROC, averaged over its seeds and points; the test metrics are not
    read. Ties go to the setting listed first (put the current one first to keep it unless another is better).

    Args:
        rows: Output of `tune` (or of several `tune` calls, with distinct `setting` indices).

    Returns:
        The `setting` index chosen.
    """
    indices = list(dict.fromkeys(r["setting"] for r in rows))
    scores = [np.mean([r["val_auroc"] for r in rows if r["setting"] == i]) for i in indices]
    return indices[int(np.argmax(scores))]


def format_tuning_table(rows: list[dict], chosen: int | None = None) -> str:
    """Markdown table of a tuning run: one row per setting, its mean validation AUROC (the score that chooses) and
    its test AUROC per point and overall, mean ± std over seeds.

    Args:
        rows: Output of `tune`.
        chosen: The chosen setting, marked in bold.
    """
    points = sorted({(r["n_train"], r["amplitude"]) for r in rows})
    lines = ["| setting | lr | weight decay | epochs | model args | val AUROC | "
             + " | ".join(f"test n={n}, a={a:g}" for n, a in points) + " | test AUROC |",
             "|---" * (len(points) + 7) + "|"]
    for index in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == index]
        args = ", ".join(f"{k}={v}" for k, v in mine[0]["model_args"].items())
        cells = [np.array([r["auroc"] for r in mine if (r["n_train"], r["amplitude"]) == p]) for p in points]
        test = np.array([r["auroc"] for r in mine])
        name = f"**{index}**" if index == chosen else str(index)
        lines.append(f"| {name} | {mine[0]['lr']:g} | {mine[0]['weight_decay']:g} | {mine[0]['epochs']} | {args} "
                     f"| {np.mean([r['val_auroc'] for r in mine]):.3f} | "
                     + " | ".join(f"{c.mean():.2f} ± {c.std():.2f}" for c in cells)
                     + f" | {test.mean():.3f} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict]) -> Figure:
    """Test AUROC against signal strength, one panel per training-set size: each model's mean over seeds as a
    line, every seed as a dot, chance (0.5) dashed.

    Args:
        rows: Output of `run_spatial_sweep`.

    Returns:
        The figure (matplotlib's Figure API, no global state).
    """
    sizes = sorted({r["n_train"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    figure = Figure(figsize=(4.2 * len(sizes), 3.6), layout="constrained")
    axes = figure.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    for ax, n_train in zip(axes, sizes):
        for index, model in enumerate(models):
            colour = f"C{index}"
            mine = [r for r in rows if r["model"] == model and r["n_train"] == n_train]
            amplitudes = sorted({r["amplitude"] for r in mine})
            means = [np.mean([r["auroc"] for r in mine if r["amplitude"] == a]) for a in amplitudes]
            ax.plot(amplitudes, means, "-o", color=colour, label=model, markersize=4)
            ax.scatter([r["amplitude"] for r in mine], [r["auroc"] for r in mine], color=colour, s=8, alpha=0.4)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{n_train} training bags")
        ax.set_xlabel("signal amplitude of a positive patch")
        ax.set_ylim(0.3, 1.02)
    axes[0].set_ylabel("test AUROC (line: mean over seeds; dots: seeds)")
    axes[-1].legend(fontsize=7, loc="lower right")
    return figure


def plot_example_bags(config: SpatialBagConfig | None = None, per_class: int = 3, seed: int = 0) -> Figure:
    """Example bags of each class on their grids: tissue grey, positive patches red.

    Args:
        config: Bag geometry (default `BENCHMARK_BAGS`).
        per_class: Bags shown per class.
        seed: Seed of the drawn bags.

    Returns:
        The figure; row 0 shows label 0 (scattered), row 1 label 1 (compact).
    """
    config = config or BENCHMARK_BAGS
    rng = np.random.default_rng(seed)
    direction = np.zeros(config.feature_dim, np.float32)
    figure = Figure(figsize=(1.8 * per_class, 3.8), layout="constrained")
    axes = figure.subplots(2, per_class, squeeze=False)
    for label, title in ((0, "scattered (label 0)"), (1, "compact (label 1)")):
        for column in range(per_class):
            _, coords, positive = make_bag(rng, label, config, direction)
            cells = (coords - coords.min(0)) // config.patch_size_level0  # (x, y) grid cells
            image = np.ones((*(cells.max(0)[::-1] + 1), 3))
            image[cells[:, 1], cells[:, 0]] = (0.75, 0.75, 0.75)
            image[cells[positive, 1], cells[positive, 0]] = (0.85, 0.1, 0.1)
            ax = axes[label, column]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(title, fontsize=8)
    return figure


def plot_benchmark(rows: list[dict]) -> Figure:
    """Test AUROC of each model: every seed as a dot, the mean as a bar, chance (0.5) dashed.

    Args:
        rows: Output of `run_spatial_benchmark` (model, seed, acc, auroc).

    Returns:
        The figure (matplotlib's Figure API, no global state).
    """
    models = list(dict.fromkeys(r["model"] for r in rows))
    figure = Figure(figsize=(1.0 + 0.9 * len(models), 3.4), layout="constrained")
    ax = figure.subplots()
    for index, model in enumerate(models):
        values = [r["auroc"] for r in rows if r["model"] == model]
        ax.bar(index, np.mean(values), color=f"C{index}", alpha=0.35, width=0.7)
        ax.scatter([index] * len(values), values, color=f"C{index}", s=14, zorder=3)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0.3, 1.02)
    ax.set_ylabel("test AUROC (bar: mean; dots: seeds)")
    return figure


def format_sweep_table(rows: list[dict]) -> str:
    """Markdown table of a sweep: one row per model, one column per (training bags, amplitude), mean ± std of the
    test AUROC over seeds.

    Args:
        rows: Output of `run_spatial_sweep`.
    """
    points = sorted({(r["n_train"], r["amplitude"]) for r in rows})
    header = "| model | " + " | ".join(f"n={n}, a={a:g}" for n, a in points) + " |"
    lines = [header, "|---" * (len(points) + 1) + "|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for n, a in points:
            values = np.array([r["auroc"] for r in rows if (r["model"], r["n_train"], r["amplitude"]) == (model, n, a)])
            cells.append(f"{values.mean():.2f} ± {values.std():.2f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(rows: list[dict], config: SpatialBagConfig | None = None) -> str:
    """Markdown table: mean ± std over seeds of test accuracy and AUROC per model.

    Args:
        rows: Output of `run_spatial_benchmark`.
        config: The bags' configuration, listed under the table when given.
    """
    lines = ["| model | test accuracy | test AUROC | seeds |", "|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        acc = np.array([r["acc"] for r in rows if r["model"] == model])
        auroc = np.array([r["auroc"] for r in rows if r["model"] == model])
        lines.append(f"| {model} | {acc.mean():.3f} ± {acc.std():.3f} | {auroc.mean():.3f} ± {auroc.std():.3f} "
                     f"| {len(acc)} |")
    if config is not None:
        lines.append("")
        lines.append("bags: " + ", ".join(f"{k}={v}" for k, v in asdict(config).items()))
    return "\n".join(lines)
