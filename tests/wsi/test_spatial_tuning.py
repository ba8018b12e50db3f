"""Tuning on the spatial sweep: the choice reads validation AUROC only, and a tuned setting's fits are the sweep's."""

import pytest

from mamba2d.data.spatial_bags import BENCHMARK_LR, SpatialBagConfig
from mamba2d.wsi.spatial_benchmark import (
    BENCHMARK_MODELS,
    BENCHMARK_WEIGHT_DECAY,
    format_tuning_table,
    run_spatial_sweep,
    select_setting,
    tune,
)


def _row(setting, seed, val_auroc, auroc):
    return {"setting": setting, "lr": 1e-3, "weight_decay": 1e-5, "epochs": 12, "model_args": {"dim": 32},
            "seed": seed, "amplitude": 3.0, "n_train": 128, "val_auroc": val_auroc, "acc": auroc, "auroc": auroc}


def test_selection_reads_validation_not_test():
    rows = [_row(0, 0, 0.70, 0.99), _row(0, 1, 0.80, 0.99),  # best on test, worse on val
            _row(1, 0, 0.90, 0.60), _row(1, 1, 0.85, 0.60),
            _row(2, 0, 0.95, 0.50), _row(2, 1, 0.40, 0.50)]  # best single seed, worse mean
    assert select_setting(rows) == 1
    table = format_tuning_table(rows, chosen=1)
    assert "| **1** |" in table and "| 0.875 |" in table


def test_ties_keep_the_setting_listed_first():
    rows = [_row(3, 0, 0.9, 0.5), _row(1, 0, 0.9, 0.9)]
    assert select_setting(rows) == 3


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tuned_fits_are_the_sweeps_fits(tmp_path):
    config = SpatialBagConfig(grid_min=6, grid_max=8, positive_min=3, positive_max=5, feature_dim=8)
    setting = {"lr": BENCHMARK_LR, "weight_decay": BENCHMARK_WEIGHT_DECAY, "epochs": 2,
               "model_args": BENCHMARK_MODELS["mean"]}
    rows = tune([setting, {**setting, "lr": 3e-3}], points=[(8, 3.0), (4, 3.0)], seeds=[0], model="mean",
                n_val=4, n_test=6, config=config, work_dir=tmp_path / "tune", progress=False)
    assert {(r["setting"], r["n_train"]) for r in rows} == {(s, n) for s in (0, 1) for n in (4, 8)}
    assert all(0.0 <= r["val_auroc"] <= 1.0 for r in rows)
    sweep = run_spatial_sweep(["mean"], seeds=[0], amplitudes=[3.0], train_sizes=[4, 8], n_val=4, n_test=6,
                              epochs=2, config=config, work_dir=tmp_path / "sweep", progress=False)
    by_size = {r["n_train"]: (r["auroc"], r["val_auroc"]) for r in sweep}
    assert {r["n_train"]: (r["auroc"], r["val_auroc"]) for r in rows if r["setting"] == 0} == by_size
