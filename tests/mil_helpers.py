"""Small CLAM-format bags and label tables for the MIL and WSI tests."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np


def write_bag(path: Path, features: np.ndarray, coords: np.ndarray, **attrs) -> Path:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=features)
        dataset = handle.create_dataset("coords", data=coords)
        dataset.attrs.update(attrs)
    return path


def random_bag(rng: np.random.Generator, n: int, dim: int = 8, stride: int = 512, grid: int = 12) -> tuple:
    """n distinct cells of a grid x grid box, level-0 coords at `stride` px with a random origin."""
    cells = rng.choice(grid * grid, size=n, replace=False)
    coords = np.stack([cells % grid, cells // grid], axis=1) * stride + rng.integers(0, 9, 2) * stride
    return rng.standard_normal((n, dim)).astype(np.float32), coords.astype(np.int64)


def write_table(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def classification_folder(root: Path, n: int = 12, dim: int = 8, seed: int = 0, attrs: bool = True) -> Path:
    """root/<slide>.h5 + labels.csv with a split column (train/val/test = half/quarter/quarter)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        features, coords = random_bag(rng, int(rng.integers(5, 30)), dim)
        write_bag(root / f"s{i:02d}.h5", features, coords, **({"patch_size_level0": 512} if attrs else {}))
        split = "train" if i < n // 2 else "val" if i < 3 * n // 4 else "test"
        rows.append([f"s{i:02d}", "tumour" if i % 2 else "normal", split])
    return write_table(root / "labels.csv", ["slide_id", "label", "split"], rows)


def survival_folder(root: Path, cases: int = 16, dim: int = 8, seed: int = 0) -> Path:
    """Cases with one or two slides each; survival.csv with case_id, slide_id, survival_months, censorship, split."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(cases):
        time, censored = round(float(rng.uniform(1, 100)), 1), int(c % 3 == 0)
        split = "train" if c < cases // 2 else "val" if c < 3 * cases // 4 else "test"
        for s in range(1 + c % 2):
            features, coords = random_bag(rng, int(rng.integers(5, 20)), dim)
            write_bag(root / f"c{c:02d}_{s}.h5", features, coords, patch_size_level0=512)
            rows.append([f"c{c:02d}", f"c{c:02d}_{s}", time, censored, split])
    return write_table(root / "survival.csv", ["case_id", "slide_id", "survival_months", "censorship", "split"], rows)
