"""Label tables and train/val/test splits for slide-level tasks.

A split is given either by a `split` column in the label CSV (values train / val / test) or by CLAM-style files
`splits_{k}.csv` whose columns `train`, `val`, `test` list the ids of each part (columns may differ in length).
`make_kfold_splits` writes such files: fold k tests on the k-th of k stratified parts and carves a stratified
validation set out of the rest, so model selection never sees the test part.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


def read_csv_rows(path: str | Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV as dicts; raises ValueError naming the file and the missing columns.

    Args:
        path: The CSV file.
        required: Columns that must be present.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSV file not found")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {columns}")
        rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return rows


def splits_from_column(rows: list[dict[str, str]], id_column: str, path: str | Path,
                       column: str = "split") -> dict[str, list[str]]:
    """{split: ids} from a split column; an id used in two splits is an error (leakage).

    Args:
        rows: The CSV rows.
        id_column: The column of the bag ids.
        path: The CSV file, named in errors.
        column: The split column.
    """
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for line, row in enumerate(rows, start=2):
        name = row.get(column, "")
        if name == "":
            continue  # rows without a split are not part of this experiment
        if name not in SPLITS:
            raise ValueError(f"{path}: line {line}: {column}={name!r}; expected one of {SPLITS} or empty")
        splits[name].append(row[id_column])
    return _deduplicate(splits, path)


def read_split_file(path: str | Path) -> dict[str, list[str]]:
    """CLAM `splits_{k}.csv`: columns train, val, test (an optional unnamed index column is ignored).

    Args:
        path: The CLAM `splits_{k}.csv` file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in SPLITS if c not in columns]
        if missing:
            hint = (" Model selection uses val and the reported metrics come from a separate held-out test split; "
                    "`mamba2d wsi splits` writes train/val/test files.") if "test" in missing else ""
            raise ValueError(f"{path}: missing column(s) {missing}; found {columns}.{hint}")
        splits: dict[str, list[str]] = {name: [] for name in SPLITS}
        for row in reader:
            for name in SPLITS:
                if (value := (row.get(name) or "").strip()):
                    splits[name].append(value)
    return _deduplicate(splits, path)


def _deduplicate(splits: dict[str, list[str]], path: str | Path) -> dict[str, list[str]]:
    seen: dict[str, str] = {}
    for name, ids in splits.items():
        for item in ids:
            if item in seen and seen[item] != name:
                raise ValueError(f"{path}: id {item!r} is in both the {seen[item]} and the {name} split")
            seen[item] = name
        splits[name] = list(dict.fromkeys(ids))
    return splits


def make_kfold_splits(ids: Sequence[str], strata: Sequence[str], folds: int, val_fraction: float = 0.15,
                      seed: int = 0) -> list[dict[str, list[str]]]:
    """Stratified k folds: fold k tests on part k; val is a stratified `val_fraction` of the other parts.

    Args:
        ids: Bag ids (unique).
        strata: The stratification label of each id.
        folds: Number of folds.
        val_fraction: Share of the non-test ids kept for validation.
        seed: Seed of the split.
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    ids, strata = np.asarray(ids), np.asarray(strata)
    if len(set(ids.tolist())) != len(ids):
        raise ValueError("make_kfold_splits: ids must be unique (one row per case or slide)")
    out = []
    for rest, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(ids, strata):
        train, val = train_test_split(rest, test_size=val_fraction, stratify=strata[rest], random_state=seed)
        out.append({"train": ids[train].tolist(), "val": ids[val].tolist(), "test": ids[test].tolist()})
    return out


def write_split_file(path: str | Path, split: dict[str, list[str]]) -> None:
    """Write one fold as a CLAM splits file: columns train, val, test listing ids.

    Args:
        path: The CSV file.
        split: Ids per split (train, val, test).
    """
    longest = max(len(v) for v in split.values())
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SPLITS)
        for i in range(longest):
            writer.writerow([split[name][i] if i < len(split[name]) else "" for name in SPLITS])
