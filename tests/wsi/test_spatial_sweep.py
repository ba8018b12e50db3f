"""Spatial benchmark sweep: every (signal strength, training-set size, seed) fit is run and reported, and the
sweep's figures are real pictures."""

import numpy as np
from PIL import Image

from mamba2d.data.spatial_bags import SpatialBagConfig
from mamba2d.wsi.spatial_benchmark import plot_example_bags, plot_sweep, run_spatial_sweep


def _saved(figure, path, dpi=50):
    figure.savefig(path, dpi=dpi)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return pixels


def test_sweep_runs_every_point_and_plots_it(tmp_path):
    config = SpatialBagConfig(grid_min=6, grid_max=8, positive_min=3, positive_max=5, feature_dim=8)
    rows = run_spatial_sweep(["mean", "grid_cnn"], seeds=[0], amplitudes=[0.5, 3.0], train_sizes=[4, 8], n_val=4,
                             n_test=6, epochs=1, config=config, work_dir=tmp_path / "work", progress=False)
    assert len(rows) == 2 * 2 * 2
    assert {(r["model"], r["amplitude"], r["n_train"]) for r in rows} == {
        (m, a, n) for m in ("mean", "grid_cnn") for a in (0.5, 3.0) for n in (4, 8)}
    assert all(0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["acc"] <= 1.0 for r in rows)
    # the smaller training set is the first bags of the larger one, balanced; val and test are shared
    lines = (tmp_path / "work" / "bags_seed0_amp3" / "labels_train4.csv").read_text().splitlines()[1:]
    train = [line.split(",") for line in lines if line.endswith(",train")]
    assert [t[0] for t in train] == [f"train_{i:04d}" for i in range(4)] and sorted(t[1] for t in train) == list("0011")
    assert sum(line.endswith(",test") for line in lines) == 6

    pixels = _saved(plot_sweep(rows), tmp_path / "sweep.png")
    assert pixels.shape[1] > 2 * pixels.shape[0]  # one panel per training-set size, side by side
    assert pixels.std() > 10  # not blank


def test_example_bags_show_compact_and_scattered_positives(tmp_path):
    pixels = _saved(plot_example_bags(per_class=2), tmp_path / "examples.png", dpi=80)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    half = pixels.shape[0] // 2
    assert red[:half].sum() > 0 and red[half:].sum() > 0  # positives drawn in both rows (both classes)
