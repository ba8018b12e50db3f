"""Spatial benchmark: every MIL model trained on synthetic bags whose label is the arrangement of positive patches
(compact region vs scattered, same count; `mamba2d.data.spatial_bags`). Each run generates its own bags from its
seed, trains with SlideMIL (model selection on val AUROC) and reports test accuracy and AUROC of the best
checkpoint. Permutation-invariant pooling (ABMIL, mean, max, TransMIL, which folds tokens in file order) sits at
chance by construction; models that read the coordinates can solve it.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
from lightning.pytorch import Trainer, seed_everything

from ..data.slides import SlideBagDataModule
from ..data.spatial_bags import BENCHMARK_BAGS, BENCHMARK_LR, SpatialBagConfig, write_spatial_bags
from ..tasks.mil import SlideMIL

# Width 32 for every model, so a CPU run takes minutes; the same optimiser settings for every model. The Mamba
# models run with gated attention pooling and Mamba's own initialisation: with upstream's tanh pooling and xavier
# initialisation they learn this task far less reliably (docs/wsi.md, "Spatial benchmark").
MAMBA_VARIANT = {"attention": "gated", "init": "mamba", "attn_dim": 32}
BENCHMARK_MODELS: dict[str, dict] = {
    "mamba_mil_2d": {"dim": 32, **MAMBA_VARIANT},
    "mamba_mil_1d": {"dim": 32, "num_layers": 1, **MAMBA_VARIANT},
    "abmil": {"dim": 32, "attn_dim": 32},
    "transmil": {"dim": 32, "heads": 4},
    "mean": {"dim": 32},
    "max": {"dim": 32},
}


def fit_and_test(model: str, data_dir: Path, seed: int, epochs: int, lr: float, work_dir: Path,
                 model_args: dict | None = None, feature_dim: int = 16) -> tuple[SlideMIL, dict[str, float]]:
    """Fit `model` on data_dir/labels.csv (train), select on val AUROC; the task holding the selected checkpoint's
    weights and their test metrics."""
    seed_everything(seed, workers=True, verbose=False)
    data = SlideBagDataModule(str(data_dir), str(data_dir / "labels.csv"))
    module = SlideMIL(model, in_dim=feature_dim, num_classes=2,
                      model_args=model_args if model_args is not None else BENCHMARK_MODELS[model],
                      lr=lr, weight_decay=1e-5)
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(work_dir))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, datamodule=data)
        (metrics,) = trainer.test(module, datamodule=data, ckpt_path="best", verbose=False)
    return module, {"acc": float(metrics["test/acc"]), "auroc": float(metrics["test/auroc"])}


def run_spatial_benchmark(models: list[str], seeds: list[int], n_train: int, n_val: int, n_test: int, epochs: int,
                          lr: float = BENCHMARK_LR, config: SpatialBagConfig | None = None,
                          work_dir: str | Path | None = None) -> list[dict]:
    """One row per (model, seed): model, seed, acc, auroc."""
    config = config or BENCHMARK_BAGS
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_dir or tmp)
        for seed in seeds:
            data_dir = root / f"bags_seed{seed}"
            write_spatial_bags(data_dir, {"train": n_train, "val": n_val, "test": n_test}, seed=seed, config=config)
            for model in models:
                _, result = fit_and_test(model, data_dir, seed, epochs, lr, root / f"{model}_seed{seed}",
                                         feature_dim=config.feature_dim)
                rows.append({"model": model, "seed": seed, **result})
                logging.getLogger(__name__).info("%s seed %d: %s", model, seed, result)
    return rows


def format_table(rows: list[dict], config: SpatialBagConfig | None = None) -> str:
    """Markdown table: mean ± std over seeds of test accuracy and AUROC per model."""
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
