"""`mamba2d kfold`: fit and test every fold of a config through LightningCLI; summary table, CSV and figure."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ..analysis.kfold import format_table, write_summary
from .lightning import build_cli


def run_kfold(config: Path, folds: Sequence[int], extra: Sequence[str] = (),
              progress: bool | None = None) -> dict[str, list[float]]:
    """Fit, then test the best validation checkpoint (else the last), of every fold; {metric: [value per fold]}.

    Args:
        config: A LightningCLI config whose datamodule takes a `fold`.
        folds: The folds to run.
        extra: More LightningCLI arguments for every fold, e.g. ["--trainer.max_epochs", "5"].
        progress: Bar over the folds (None: only on a terminal).
    """
    results: dict[str, list[float]] = {}
    for fold in tqdm(folds, desc="folds", unit="fold", disable=None if progress is None else not progress):
        cli = build_cli(["--config", str(config), "--data.init_args.fold", str(fold), *extra], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        best = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
        (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or "last")
        print(f"fold {fold}: best checkpoint {best or '(none)'}; "
              + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())), flush=True)
        for key, value in metrics.items():
            results.setdefault(key, []).append(float(value))
    return results


def kfold(train_config: Path, folds: int = 5, fold_ids: list[int] | None = None, out_dir: Path = Path("runs/kfold"),
          progress: bool | None = None, extra: Sequence[str] = ()) -> dict[str, list[float]]:
    """Fit and test every fold of a config; print mean ± std per metric and write `kfold_summary.csv`/`.png` and
    `kfold.json` (per-fold values) into `out_dir`. LightningCLI arguments for every fold follow a bare `--`:
    `mamba2d kfold configs/wsi/x.yaml --folds 5 -- --trainer.max_epochs 5`.

    Args:
        train_config: A LightningCLI config whose datamodule takes a `fold` (the WSI configs).
        folds: Run folds 0 .. folds-1.
        fold_ids: Run these folds instead.
        out_dir: Folder of the summary files.
        progress: Bar over the folds (None: only on a terminal).
        extra: LightningCLI arguments for every fold (on the command line: after `--`).
    """
    ids = list(fold_ids) if fold_ids else list(range(folds))
    results = run_kfold(train_config, ids, extra, progress)
    print(format_table(results))
    table, figure = write_summary(results, out_dir, title=f"{Path(train_config).stem}: {len(ids)} folds")
    (Path(out_dir) / "kfold.json").write_text(json.dumps({"folds": ids, "metrics": results}, indent=2) + "\n")
    print(f"wrote {table}, {figure} and {Path(out_dir) / 'kfold.json'}")
    return results
