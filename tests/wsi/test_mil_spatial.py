"""Spatial benchmark at small size: the label is the arrangement of positive patches (one compact region vs
scattered, same count and same features), so permutation-invariant ABMIL stays at chance while 2DMambaMIL, which
scans the slide's grid, separates the classes on held-out bags. Fixed seeds; model selection on val, metrics on test.
"""

import numpy as np
import pytest
import torch

from mamba2d.data.bags import read_bag
from mamba2d.data.spatial_bags import SpatialBagConfig, make_bag, write_spatial_bags
from mamba2d.wsi.spatial_benchmark import fit_and_test, format_table


def neighbours(mask_cells: set) -> int:
    return sum((r + dr, c + dc) in mask_cells for r, c in mask_cells for dr, dc in ((0, 1), (1, 0)))


def test_generator_same_count_and_features_different_arrangement():
    config = SpatialBagConfig()
    rng = np.random.default_rng(0)
    direction = np.ones(config.feature_dim, np.float32) / np.sqrt(config.feature_dim)
    for label in (0, 1):
        for _ in range(20):
            features, coords, positive = make_bag(rng, label, config, direction)
            cells = {tuple(c) for c in (coords[positive] // config.patch_size_level0).tolist()}
            assert config.positive_min <= positive.sum() <= config.positive_max
            touching = neighbours(cells)
            assert (touching >= len(cells) - 1) if label == 1 else touching == 0  # connected blob vs isolated
            assert len({tuple(c) for c in coords.tolist()}) == len(coords)


def test_spatial_bags_are_clam_files(tmp_path):
    csv = write_spatial_bags(tmp_path, {"train": 4, "test": 2}, seed=0)
    assert csv.read_text().splitlines()[0] == "slide_id,label,split"
    bag = read_bag(tmp_path / "train_0000.h5")
    assert bag.stride == 256 and bag.stride_source == "attrs" and bag.features.shape[1] == 16


@pytest.fixture
def one_thread():
    """Bags of ~150 patches: intra-op threads cost more than they gain and make the timing erratic on busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_2dmambamil_beats_abmil_on_held_out_spatial_bags(tmp_path, one_thread):
    write_spatial_bags(tmp_path / "bags", {"train": 96, "val": 32, "test": 64}, seed=0)
    rows = [{"model": model, "seed": 0,
             **fit_and_test(model, tmp_path / "bags", seed=0, epochs=12, lr=1e-3, work_dir=tmp_path / model)[1]}
            for model in ("mamba_mil_2d", "abmil")]
    print(format_table(rows))
    mamba, abmil = rows
    assert mamba["auroc"] >= 0.85 and mamba["acc"] >= 0.75
    assert abmil["auroc"] <= 0.7  # chance by construction
    assert mamba["auroc"] >= abmil["auroc"] + 0.25
