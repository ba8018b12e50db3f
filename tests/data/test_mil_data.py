"""Feature bags and SlideBagDataModule: grids, splits, several slides per case, survival bins, bad input."""

import logging

import h5py
import numpy as np
import pytest
import torch
from mil_helpers import classification_folder, random_bag, survival_folder, write_bag, write_table

from mamba2d.data.bags import BagFileError, read_bag
from mamba2d.data.slides import SlideBagDataModule
from mamba2d.data.splits import make_kfold_splits, read_split_file, write_split_file
from mamba2d.data.survival import assign_time_bins, fit_time_bins


def test_grid_cell_from_trident_attrs_clam_attrs_config_or_detection(tmp_path, caplog):
    features, coords = random_bag(np.random.default_rng(0), 20, stride=448)
    write_bag(tmp_path / "trident.h5", features, coords, patch_size_level0=448)
    write_bag(tmp_path / "clam.h5", features, coords, patch_size=224, patch_level=1, downsample=[2.0, 2.0])
    write_bag(tmp_path / "bare.h5", features, coords)
    assert (read_bag(tmp_path / "trident.h5").stride, read_bag(tmp_path / "trident.h5").stride_source) == (448, "attrs")
    assert read_bag(tmp_path / "clam.h5").stride == 448
    assert (read_bag(tmp_path / "trident.h5", patch_stride=224).stride_source) == "config"
    with caplog.at_level(logging.INFO, logger="mamba2d.data.bags"):
        bare = read_bag(tmp_path / "bare.h5")
    assert (bare.stride, bare.stride_source) == (448, "detected")
    assert "bare.h5" in caplog.text and "detected from the coordinates" in caplog.text
    positions = bare.positions
    assert positions.min() == 0  # grid = bounding box of this slide's patches
    expected = torch.from_numpy((coords - coords.min(0)) // 448)[:, [1, 0]]  # (x, y) -> (row, col)
    assert torch.equal(positions, expected)


def test_grid_spans_only_the_slide_patches_far_from_the_origin(tmp_path):
    coords = np.array([[100_000, 80_000], [100_256, 80_000], [100_000, 80_256]])
    write_bag(tmp_path / "far.h5", np.zeros((3, 4), np.float32), coords, patch_size_level0=256)
    positions = read_bag(tmp_path / "far.h5").positions
    assert positions.tolist() == [[0, 0], [0, 1], [1, 0]]


def test_classification_datamodule_with_split_column(tmp_path):
    csv = classification_folder(tmp_path)
    data = SlideBagDataModule(str(tmp_path), str(csv))
    data.setup("fit")
    assert data.class_names == ["normal", "tumour"] and data.num_classes == 2
    assert [len(data.records[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    bag = next(iter(data.train_dataloader()))
    assert bag["features"].shape[1] == 8 and bag["positions"].shape == (len(bag["features"]), 2)
    assert bag["segments"].unique().tolist() == [0] and bag["label"].item() in (0, 1)


def test_split_files_and_kfold_writer(tmp_path):
    csv = classification_folder(tmp_path, n=20)
    ids = [f"s{i:02d}" for i in range(20)]
    folds = make_kfold_splits(ids, [i % 2 for i in range(20)], folds=4, val_fraction=0.25, seed=0)
    tests = [set(f["test"]) for f in folds]
    assert set().union(*tests) == set(ids) and sum(map(len, tests)) == 20  # every id tested exactly once
    for fold in folds:
        assert not (set(fold["train"]) & set(fold["val"])) and not (set(fold["val"]) & set(fold["test"]))
    (tmp_path / "splits").mkdir()
    for k, fold in enumerate(folds):
        write_split_file(tmp_path / "splits" / f"splits_{k}.csv", fold)
    assert read_split_file(tmp_path / "splits" / "splits_2.csv") == folds[2]
    data = SlideBagDataModule(str(tmp_path), str(csv), split_dir=str(tmp_path / "splits"), fold=2)
    data.setup("fit")
    assert [r.bag_id for r in data.records["test"]] == folds[2]["test"]


def test_split_file_without_test_column_is_refused(tmp_path):
    csv = classification_folder(tmp_path)
    (tmp_path / "splits").mkdir()
    write_table(tmp_path / "splits" / "splits_0.csv", ["train", "val"], [["s00", "s01"]])
    with pytest.raises(ValueError, match=r"splits_0.csv: missing column\(s\) \['test'\].*held-out test"):
        SlideBagDataModule(str(tmp_path), str(csv), split_dir=str(tmp_path / "splits")).setup("fit")


def test_survival_one_bag_per_case_with_each_slide_as_a_segment(tmp_path):
    csv = survival_folder(tmp_path)
    data = SlideBagDataModule(str(tmp_path), str(csv), task="survival")
    data.setup("fit")
    record = next(r for r in data.records["train"] if len(r.slide_ids) == 2)
    bag = data.train_dataloader().dataset[data.records["train"].index(record)]
    sizes = [len(read_bag(tmp_path / f"{s}.h5").features) for s in record.slide_ids]
    assert len(bag["features"]) == sum(sizes)  # no patch dropped
    assert torch.bincount(bag["segments"]).tolist() == sizes
    for seg in (0, 1):  # each slide keeps its own grid
        assert bag["positions"][bag["segments"] == seg].min(0).values.tolist() == [0, 0]
    assert {r.label for recs in data.records.values() for r in recs} <= {0, 1, 2, 3}


def test_survival_bins_come_from_uncensored_training_cases_only(tmp_path):
    csv = survival_folder(tmp_path)
    data = SlideBagDataModule(str(tmp_path), str(csv), task="survival")
    data.setup("fit")
    train = data.records["train"]
    expected = np.quantile([r.time for r in train if r.censorship == 0], [0.25, 0.5, 0.75])
    np.testing.assert_allclose(data.time_bin_edges, expected)
    # Changing val/test times must not move the bins.
    text = csv.read_text().splitlines()
    changed = [line if ",train" in line or i == 0 else line.replace(line.split(",")[2], "999.0")
               for i, line in enumerate(text)]
    csv.write_text("\n".join(changed) + "\n")
    other = SlideBagDataModule(str(tmp_path), str(csv), task="survival")
    other.setup("fit")
    np.testing.assert_allclose(other.time_bin_edges, expected)
    assert all(r.label == 3 for r in other.records["test"])


def test_time_bins_helpers():
    edges = fit_time_bins([1, 2, 3, 4, 5, 100], [0, 0, 0, 0, 0, 1], num_bins=4)
    np.testing.assert_allclose(edges, [2, 3, 4])
    assert assign_time_bins([0.5, 2, 2.5, 3.9, 50], edges).tolist() == [0, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="at least 4 uncensored"):
        fit_time_bins([1, 2, 3, 4], [0, 0, 1, 1])


@pytest.mark.parametrize("case,message", [
    ("no_features", r"missing dataset\(s\) \['features'\]"),
    ("no_coords", r"missing dataset\(s\) \['coords'\]"),
    ("mismatch", "5 feature rows but 4 coords rows"),
    ("empty", "empty bag"),
    ("nan", r"1 patch\(es\) have NaN/inf features \(first rows \[2\]\)"),
    ("inf", "NaN/inf"),
    ("duplicate", "duplicate coordinate"),
    ("not_hdf5", "not a readable HDF5 file"),
    ("overlap", "overlap on the grid"),
])
def test_bad_bag_files_name_the_file(tmp_path, case, message):
    path = tmp_path / f"{case}.h5"
    features, coords = np.ones((5, 3), np.float32), np.arange(10).reshape(5, 2) * 256
    if case == "not_hdf5":
        path.write_bytes(b"this is not hdf5")
    else:
        with h5py.File(path, "w") as handle:
            if case != "no_features":
                f = {"mismatch": features, "empty": features[:0], "nan": features.copy(), "inf": features.copy()}.get(
                    case, features)
                if case == "nan":
                    f[2, 1] = np.nan
                if case == "inf":
                    f[0, 0] = np.inf
                handle["features"] = f
            if case != "no_coords":
                c = {"mismatch": coords[:4], "empty": coords[:0], "duplicate": coords[[0, 1, 1, 2, 3]],
                     "overlap": np.array([[0, 0], [100, 0], [600, 0], [1100, 0], [1600, 0]])}.get(case, coords)
                handle["coords"] = c
                handle["coords"].attrs["patch_size_level0"] = 512 if case == "overlap" else 256
    with pytest.raises(BagFileError, match=message) as info:
        read_bag(path)
    assert str(path) in str(info.value)


def test_missing_bag_files_are_all_listed(tmp_path):
    csv = classification_folder(tmp_path)
    (tmp_path / "s01.h5").unlink()
    (tmp_path / "s07.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 bag file\(s\).*s01\.h5.*s07\.h5"):
        SlideBagDataModule(str(tmp_path), str(csv)).setup("fit")


def test_case_with_slides_in_two_splits_is_leakage(tmp_path):
    rng = np.random.default_rng(0)
    for sid in ("a1", "a2", "b1"):
        write_bag(tmp_path / f"{sid}.h5", *random_bag(rng, 6))
    csv = write_table(tmp_path / "labels.csv", ["case_id", "slide_id", "label", "split"],
                      [["A", "a1", 0, "train"], ["A", "a2", 0, "test"], ["B", "b1", 1, "val"]])
    with pytest.raises(ValueError, match=r"\['A'\] have slides in more than one split"):
        SlideBagDataModule(str(tmp_path), str(csv)).setup("fit")


def test_bad_tables(tmp_path):
    csv = classification_folder(tmp_path)
    with pytest.raises(ValueError, match=r"labels.csv: missing column\(s\) \['grade'\]"):
        SlideBagDataModule(str(tmp_path), str(csv), label_column="grade").setup("fit")
    with pytest.raises(ValueError, match=r"labels \['tumour'\] are not in class_names"):
        SlideBagDataModule(str(tmp_path), str(csv), class_names=["normal"]).setup("fit")
    bad = write_table(tmp_path / "bad.csv", ["slide_id", "label", "split"], [["s00", "x", "training"]])
    with pytest.raises(ValueError, match="bad.csv: line 2: split='training'"):
        SlideBagDataModule(str(tmp_path), str(bad)).setup("fit")
