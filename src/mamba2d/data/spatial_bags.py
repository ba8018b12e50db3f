"""Synthetic whole-slide bags whose label depends only on the spatial arrangement of positive patches.

Each bag is a blob of "tissue" cells on a grid (an ellipse with random axes). `num_positive` of its patches carry a
signal (features = noise + amplitude * a fixed direction); the others are pure noise. Both classes draw
`num_positive` from the same range and the same features, so every permutation-invariant pooling of patch features
sees the same distribution in both classes:

- label 1 ("compact"): the positive patches form one 4-connected, compact region (grown from a seed by adding the
  frontier cell with the most positive neighbours);
- label 0 ("scattered"): no two positive patches touch (not even diagonally).

Bags are written in CLAM format (`features`, `coords` in level-0 pixels with a random origin, `patch_size_level0`
attribute) with their patches in random order, so only a model that uses the coordinates can tell the classes
apart. `labels.csv` has `slide_id, label, split`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

NEIGHBOURS_4 = ((-1, 0), (1, 0), (0, -1), (0, 1))


@dataclass
class SpatialBagConfig:
    """How the synthetic spatial bags are drawn: the label is whether the positive patches form one compact region.

    Args:
        grid_min: Smallest grid side (patches).
        grid_max: Largest grid side.
        positive_min: Fewest positive patches per bag.
        positive_max: Most positive patches per bag.
        feature_dim: Feature size D.
        amplitude: Shift of the positive patches' features along a fixed direction.
        patch_size_level0: Patch stride in level-0 pixels (written as the bag's attribute).
    """
    grid_min: int = 10
    grid_max: int = 14
    positive_min: int = 6
    positive_max: int = 10
    feature_dim: int = 16
    amplitude: float = 3.0
    patch_size_level0: int = 256


#: The spatial benchmark's settings (table in docs/wsi.md; the zoo's `*.spatial_mil` checkpoints): bags, bags per
#: split for each seed, epochs and learning rate.
BENCHMARK_BAGS = SpatialBagConfig(grid_min=10, grid_max=16, positive_min=6, positive_max=12, feature_dim=32)
BENCHMARK_SPLITS = {"train": 128, "val": 48, "test": 128}
BENCHMARK_EPOCHS = 12
BENCHMARK_LR = 1e-3


def _tissue(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    ry, rx = rng.uniform(0.75, 1.0) * height / 2, rng.uniform(0.75, 1.0) * width / 2
    return ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0


def _compact(rng: np.random.Generator, tissue: np.ndarray, count: int) -> np.ndarray:
    cells = np.argwhere(tissue)
    positive = np.zeros_like(tissue)
    positive[tuple(cells[rng.integers(len(cells))])] = True
    while positive.sum() < count:
        frontier = {}
        for r, c in np.argwhere(positive):
            for dr, dc in NEIGHBOURS_4:
                y, x = r + dr, c + dc
                if 0 <= y < tissue.shape[0] and 0 <= x < tissue.shape[1] and tissue[y, x] and not positive[y, x]:
                    frontier[(y, x)] = frontier.get((y, x), 0) + 1
        if not frontier:
            return _compact(rng, tissue, count)  # seed in a corner too tight for the blob: reseed
        best = max(frontier.values())
        choices = [cell for cell, n in frontier.items() if n == best]
        positive[choices[rng.integers(len(choices))]] = True
    return positive


def _scattered(rng: np.random.Generator, tissue: np.ndarray, count: int) -> np.ndarray:
    for _ in range(1000):
        positive = np.zeros_like(tissue)
        blocked = ~tissue.copy()
        for _ in range(count):
            free = np.argwhere(~blocked)
            if len(free) == 0:
                break
            r, c = free[rng.integers(len(free))]
            positive[r, c] = True
            blocked[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = True
        if positive.sum() == count:
            return positive
    raise ValueError(f"cannot scatter {count} non-touching positives in a tissue of {int(tissue.sum())} cells")


def make_bag(rng: np.random.Generator, label: int, config: SpatialBagConfig, direction: np.ndarray):
    """One bag: features (N, D) float32, coords (N, 2) int64 level-0 (x, y), positive mask (N,).

    Args:
        rng: The random generator.
        label: 1: the positive patches form one compact region; 0: they are scattered.
        config: The drawing settings.
        direction: (D,) unit feature direction of the positive patches.
    """
    height, width = rng.integers(config.grid_min, config.grid_max + 1, size=2)
    tissue = _tissue(rng, height, width)
    count = int(rng.integers(config.positive_min, config.positive_max + 1))
    positive = (_compact if label == 1 else _scattered)(rng, tissue, count)
    cells = np.argwhere(tissue)
    order = rng.permutation(len(cells))
    cells = cells[order]
    is_positive = positive[cells[:, 0], cells[:, 1]]
    features = rng.standard_normal((len(cells), config.feature_dim)).astype(np.float32)
    features[is_positive] += config.amplitude * direction
    origin = rng.integers(0, 50, size=2) * config.patch_size_level0
    coords = cells[:, ::-1] * config.patch_size_level0 + origin  # (row, col) -> level-0 (x, y)
    return features, coords.astype(np.int64), is_positive


def write_spatial_bags(out_dir: str | Path, splits: dict[str, int], seed: int = 0,
                       config: SpatialBagConfig | None = None) -> Path:
    """Write `{split: number of bags}` balanced bags and `labels.csv`; returns the CSV path.

    Args:
        out_dir: Folder of the bags and the CSV.
        splits: Bags per split.
        seed: Seed of the draw.
        config: The drawing settings (None: the defaults).
    """
    config = config or SpatialBagConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(12345).standard_normal(config.feature_dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    rows = []
    for split, count in splits.items():
        for i in range(count):
            label = i % 2
            features, coords, _ = make_bag(rng, label, config, direction)
            slide_id = f"{split}_{i:04d}"
            with h5py.File(out_dir / f"{slide_id}.h5", "w") as handle:
                handle.create_dataset("features", data=features)
                dataset = handle.create_dataset("coords", data=coords)
                dataset.attrs["patch_size_level0"] = config.patch_size_level0
                dataset.attrs["patch_size"] = config.patch_size_level0
            rows.append((slide_id, label, split))
    csv_path = out_dir / "labels.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label", "split"])
        writer.writerows(rows)
    return csv_path
