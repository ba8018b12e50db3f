"""`SlideBagDataModule`: whole-slide feature bags (CLAM / TRIDENT h5) with classification or survival labels.

Files: `<features_dir>/<slide_id>.h5` (see `mamba2d.data.bags`) and one CSV.

- classification CSV: `slide_id, label` (+ optional `case_id`, `split`). One bag = one slide. With a `case_id`
  column, a case whose slides fall in different splits is an error (patient-level leakage).
- survival CSV: `slide_id, survival_months, censorship` (+ optional `case_id`, `split`); censorship 1 = censored.
  One bag = one case (patient): the patches of all its slides, each slide on its own grid (2DMambaMIL scans every
  slide separately and pools attention over all real patches of the case). Without `case_id`, each slide is a case.
  The time bins are the quantiles of the uncensored cases' times of the training split only.

Splits: a `split` column (train/val/test) or `split_dir/splits_{fold}.csv` (CLAM columns train, val, test listing
slide ids for classification, case ids for survival). Each split must have its bag files: all missing ones are
listed in one error. One bag per step (batch size 1): bags differ in size and grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import Dataset

from .bags import read_bag
from .base import BaseDataModule
from .splits import read_csv_rows, read_split_file, splits_from_column
from .survival import assign_time_bins, fit_time_bins

log = logging.getLogger(__name__)

TASKS = ("classification", "survival")


@dataclass
class BagRecord:
    """One bag of a split: its slides and its label.

    Args:
        bag_id: Slide id (classification) or case id (survival).
        slide_ids: The slides whose patches form the bag.
        label: Class index, or survival time bin.
        time: Survival or censoring time in months (survival).
        censorship: 1 = censored, 0 = event observed (survival).
    """
    bag_id: str  # slide id (classification) or case id (survival)
    slide_ids: list[str]
    label: int  # class index, or survival bin
    time: float = float("nan")
    censorship: int = 0


class SlideBagDataset(Dataset):
    """One item per bag: features (N, D), positions (N, 2) per-slide grid (row, col), segments (N,) slide index.

    Args:
        records: The split's bags.
        features_dir: Folder of the `<slide_id>.h5` files.
        patch_stride: Level-0 patch stride (None: from each bag).
    """

    def __init__(self, records: list[BagRecord], features_dir: str | Path, patch_stride: int | None = None):
        self.records, self.features_dir, self.patch_stride = records, Path(features_dir), patch_stride

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        bags = [read_bag(self.features_dir / f"{sid}.h5", self.patch_stride) for sid in record.slide_ids]
        dims = {bag.features.shape[1] for bag in bags}
        if len(dims) > 1:
            raise ValueError(f"bag {record.bag_id!r}: its slides have different feature sizes {sorted(dims)} "
                             f"({[str(b.path) for b in bags]})")
        return {
            "bag_id": record.bag_id,
            "features": torch.cat([bag.features for bag in bags]),
            "positions": torch.cat([bag.positions for bag in bags]),
            "segments": torch.cat(
                [torch.full((len(bag.features),), i, dtype=torch.long) for i, bag in enumerate(bags)]),
            "coords": torch.cat([bag.coords for bag in bags]),
            "label": torch.tensor(record.label, dtype=torch.long),
            "time": torch.tensor(record.time, dtype=torch.float32),
            "censorship": torch.tensor(record.censorship, dtype=torch.long),
        }


def single_bag(batch: list[dict]) -> dict:
    """Collate for batch_size 1: the bag itself (no padding of variable-size bags).

    Args:
        batch: A list holding one bag dict.
    """
    return batch[0]


def sorted_labels(labels: list[str]) -> list[str]:
    """The distinct labels in class-index order: numerically when all are integers, else alphabetically.

    Args:
        labels: The label of every row.
    """
    numeric = all(s.lstrip("-").isdigit() for s in labels)
    return sorted(set(labels), key=int if numeric else str)


class SlideBagDataModule(BaseDataModule):
    """Feature bags with slide labels (classification) or survival data, one bag per batch.

    Under the CLI the model's `task`, `num_classes` (from the CSV's labels, or `class_names`) and `num_bins` come
    from here.

    Args:
        features_dir: Folder of the `<slide_id>.h5` bags.
        csv_path: The labels CSV (columns in the module docstring).
        task: "classification" or "survival".
        split_dir: Folder of CLAM `splits_{fold}.csv` files (None: the CSV's `split` column).
        fold: Which `splits_{fold}.csv` to use.
        label_column: The CSV column of the class labels (classification).
        class_names: The labels in class-index order (None: the CSV's labels, sorted).
        num_bins: Survival time bins (quantiles of the training split's uncensored times).
        patch_stride: Level-0 patch stride (None: from each bag's attributes or coordinates).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        features_dir: str,
        csv_path: str,
        task: str = "classification",
        split_dir: str | None = None,
        fold: int = 0,
        label_column: str = "label",
        class_names: list[str] | None = None,
        num_bins: int = 4,
        patch_stride: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"SlideBagDataModule: task must be one of {TASKS}, got {task!r}")
        self.save_hyperparameters()
        self.features_dir, self.csv_path, self.task = Path(features_dir), Path(csv_path), task
        self.class_names = list(class_names) if class_names else None
        self.time_bin_edges: np.ndarray | None = None
        self.records: dict[str, list[BagRecord]] = {}

    @property
    def num_classes(self) -> int:
        """Classes of a classification task: `class_names`, else the CSV's labels (read on first use).

        Raises:
            AttributeError: Survival data has time bins (`num_bins`), not classes.
        """
        if self.task != "classification":
            raise AttributeError("num_classes: survival data has time bins (num_bins), not classes")
        if self.class_names is None:
            rows = read_csv_rows(self.csv_path, ["slide_id", self.hparams.label_column])
            self.class_names = sorted_labels([row[self.hparams.label_column] for row in rows])
        return len(self.class_names)

    @property
    def num_bins(self) -> int:
        """Survival time bins (the `num_bins` argument)."""
        return self.hparams.num_bins

    def setup(self, stage: str | None = None) -> None:
        if self.records:
            return
        hp = self.hparams
        required = ["slide_id", hp.label_column] if self.task == "classification" else \
            ["slide_id", "survival_months", "censorship"]
        rows = read_csv_rows(self.csv_path, required)
        has_case = "case_id" in rows[0]
        id_column = "case_id" if (self.task == "survival" and has_case) else "slide_id"
        if hp.split_dir is not None:
            splits = read_split_file(Path(hp.split_dir) / f"splits_{hp.fold}.csv")
        elif "split" in rows[0]:
            splits = splits_from_column(rows, id_column, self.csv_path)
        else:
            raise ValueError(f"{self.csv_path}: no 'split' column and no split_dir given; say which bags are "
                             "train/val/test")
        records = self._survival_records(rows, id_column) if self.task == "survival" else self._class_records(rows)
        unknown = sorted({i for ids in splits.values() for i in ids} - set(records))
        if unknown:
            raise ValueError(f"split ids not in {self.csv_path}: {unknown}")
        if self.task == "classification" and has_case:
            self._check_case_leakage(rows, splits)
        self.records = {name: [records[i] for i in ids] for name, ids in splits.items()}
        missing = sorted({f"{self.features_dir / sid}.h5" for recs in self.records.values() for r in recs
                          for sid in r.slide_ids if not (self.features_dir / f"{sid}.h5").is_file()})
        if missing:
            raise FileNotFoundError(f"{len(missing)} bag file(s) listed in {self.csv_path} are missing: {missing}")
        if self.task == "survival":
            self._bin_survival_times()
        log.info("bags: %s", {name: len(recs) for name, recs in self.records.items()})

    def _class_records(self, rows: list[dict]) -> dict[str, BagRecord]:
        column = self.hparams.label_column
        labels = [row[column] for row in rows]
        if self.class_names is None:
            self.class_names = sorted_labels(labels)
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(f"{self.csv_path}: labels {unknown} are not in class_names {self.class_names}")
        records = {}
        for row in rows:
            if row["slide_id"] in records:
                raise ValueError(f"{self.csv_path}: slide_id {row['slide_id']!r} appears twice")
            records[row["slide_id"]] = BagRecord(row["slide_id"], [row["slide_id"]], index[row[column]])
        return records

    def _survival_records(self, rows: list[dict], id_column: str) -> dict[str, BagRecord]:
        records: dict[str, BagRecord] = {}
        for line, row in enumerate(rows, start=2):
            try:
                time, censorship = float(row["survival_months"]), int(float(row["censorship"]))
            except ValueError as err:
                raise ValueError(f"{self.csv_path}: line {line}: bad survival_months/censorship ({err})") from err
            if censorship not in (0, 1) or not np.isfinite(time) or time < 0:
                raise ValueError(f"{self.csv_path}: line {line}: censorship must be 0/1 and survival_months >= 0")
            case = row[id_column]
            if case in records:
                record = records[case]
                if (record.time, record.censorship) != (time, censorship):
                    raise ValueError(f"{self.csv_path}: case {case!r} has slides with different survival data")
                record.slide_ids.append(row["slide_id"])
            else:
                records[case] = BagRecord(case, [row["slide_id"]], -1, time, censorship)
        return records

    def _check_case_leakage(self, rows: list[dict], splits: dict[str, list[str]]) -> None:
        split_of = {sid: name for name, ids in splits.items() for sid in ids}
        case_splits: dict[str, set[str]] = {}
        for row in rows:
            if row["slide_id"] in split_of:
                case_splits.setdefault(row["case_id"], set()).add(split_of[row["slide_id"]])
        leaking = sorted(case for case, names in case_splits.items() if len(names) > 1)
        if leaking:
            raise ValueError(f"{self.csv_path}: case(s) {leaking} have slides in more than one split (leakage)")

    def _bin_survival_times(self) -> None:
        train = self.records["train"]
        if not train:
            raise ValueError(f"{self.csv_path}: survival needs a non-empty train split to define the time bins")
        self.time_bin_edges = fit_time_bins([r.time for r in train], [r.censorship for r in train],
                                            self.hparams.num_bins)
        log.info("survival time bins (months, from %d training cases): edges %s", len(train),
                 np.round(self.time_bin_edges, 2).tolist())
        for records in self.records.values():
            for record, label in zip(records, assign_time_bins([r.time for r in records], self.time_bin_edges)):
                record.label = int(label)

    def bag_paths(self) -> list[Path]:
        """Every bag file of every split (after `setup`), each once: what `check_feature_dim` reads.

        Returns:
            The `.h5` paths in split order.
        """
        paths = [self.features_dir / f"{sid}.h5" for recs in self.records.values() for r in recs
                 for sid in r.slide_ids]
        return list(dict.fromkeys(paths))

    def dataset(self, split: str) -> Dataset:
        """The split's bags; predict uses the test split.

        Args:
            split: One of train, val, test, predict.

        Raises:
            ValueError: The split has no bags.
        """
        split = "test" if split == "predict" else split
        if not self.records.get(split):
            raise ValueError(f"{self.csv_path}: the {split} split is empty")
        return SlideBagDataset(self.records[split], self.features_dir, self.hparams.patch_stride)

    def batch_size(self, split: str) -> int:
        """One bag per batch: bags differ in size and grid.

        Args:
            split: One of train, val, test, predict.
        """
        return 1

    def collate_fn(self, split: str):
        """The bag itself, unpadded.

        Args:
            split: One of train, val, test, predict.
        """
        return single_bag

    def plot(self, sample: dict, prediction=None) -> Figure:
        """Each slide of a bag as its patch grid: the model's per-patch attention (if given), else the patches kept.

        Args:
            sample: One bag dict as the loaders yield it (positions, segments, label, bag_id).
            prediction: The MIL output of that bag (`MILOutput`, or SlideMIL's predict dict with "scores" and
                "probs"/"risk"), or None.
        """
        scores = getattr(prediction, "scores", None)
        if isinstance(prediction, dict):
            scores = prediction["scores"]
        positions = sample["positions"].long()
        segments = sample.get("segments")
        segments = torch.zeros(len(positions), dtype=torch.long) if segments is None else segments.long()
        values = torch.ones(len(positions)) if scores is None else scores.detach().float().cpu()
        label = int(sample["label"])
        title = f"{sample['bag_id']}: " + (f"class {self.class_names[label]}" if self.task == "classification"
                                             and self.class_names else f"time bin {label}")
        if isinstance(prediction, dict) and "probs" in prediction:
            title += f", predicted {int(prediction['probs'].argmax())} (p={float(prediction['probs'].max()):.2f})"
        slides = sorted(segments.unique().tolist())
        figure = Figure(figsize=(4 * len(slides), 4), layout="constrained")
        axes = figure.subplots(1, len(slides), squeeze=False)[0]
        for ax, slide in zip(axes, slides):
            rows_cols = positions[segments == slide]
            grid = np.full((int(rows_cols[:, 0].max()) + 1, int(rows_cols[:, 1].max()) + 1), np.nan)
            grid[rows_cols[:, 0].numpy(), rows_cols[:, 1].numpy()] = values[segments == slide].numpy()
            image = ax.imshow(grid, cmap="viridis", interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"slide {slide}", fontsize=9)
            if scores is not None:
                figure.colorbar(image, ax=ax, shrink=0.8, label="attention")
        figure.suptitle(title, fontsize=10)
        return figure
