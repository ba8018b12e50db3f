"""CLAM / TRIDENT feature bags: read and validate `<slide_id>.h5`, map level-0 coordinates to a per-slide grid.

A bag file holds `features` float (N, D) and `coords` int (N, 2) = level-0 (x, y) of each patch's top-left corner.
The grid cell is the patch stride at level 0, taken from (in order) the `patch_stride` the caller gives, the file's
attributes (TRIDENT `patch_size_level0`; CLAM `patch_size` x `downsample` of `patch_level`), or detected from the
coordinates (smallest gap between distinct x and between distinct y), with a logged message saying which.
Every problem raises `BagFileError` naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

log = logging.getLogger(__name__)


class BagFileError(ValueError):
    """A feature-bag file that cannot be used; the message names the file and what is wrong with it."""


@dataclass
class SlideBag:
    """One slide's feature bag, validated.

    Args:
        path: The bag file.
        features: (N, D) float32 patch features.
        coords: (N, 2) int64 level-0 (x, y) of the patches.
        stride: Grid cell size in level-0 pixels.
        stride_source: Where the stride came from: "config", "attrs" or "detected".
        positions: (N, 2) int64 (row, col) on the grid spanning this slide's patches.
        attrs: The h5 file's attributes.
    """
    path: Path
    features: torch.Tensor  # (N, D) float32
    coords: torch.Tensor  # (N, 2) int64 level-0 (x, y)
    stride: int  # grid cell size in level-0 pixels
    stride_source: str  # "config", "attrs" or "detected"
    positions: torch.Tensor  # (N, 2) int64 (row, col) on the grid spanning this slide's patches
    attrs: dict = field(default_factory=dict)


def _attrs(obj) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in obj.attrs.items()}


def stride_from_attrs(attrs: dict) -> int | None:
    """Patch stride at level 0 from TRIDENT (`patch_size_level0`) or CLAM (`patch_size`, `downsample`) attributes.

    Args:
        attrs: The h5 attributes.
    """
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    if "patch_size" in attrs and "downsample" in attrs:
        downsample = np.atleast_1d(np.asarray(attrs["downsample"], dtype=float))
        return int(round(float(attrs["patch_size"]) * float(downsample[0])))
    if "patch_size" in attrs and int(attrs.get("patch_level", 0)) == 0:
        return int(attrs["patch_size"])
    return None


def detect_stride(coords: np.ndarray) -> int | None:
    """Smallest positive gap between distinct x values and between distinct y values; None for a single patch.

    Args:
        coords: (N, 2) level-0 (x, y).
    """
    gaps = [np.diff(np.unique(coords[:, axis])) for axis in (0, 1)]
    gaps = np.concatenate([g[g > 0] for g in gaps])
    return int(gaps.min()) if gaps.size else None


def coords_to_positions(coords: torch.Tensor, stride: int, path: Path | str = "<memory>") -> torch.Tensor:
    """Level-0 (x, y) -> grid (row, col) relative to the patches' bounding box; raises if two patches share a cell.

    Args:
        coords: (N, 2) level-0 (x, y).
        stride: Grid cell size in level-0 pixels.
        path: The bag file, named in the error.
    """
    origin = coords.min(dim=0).values
    cells = torch.round((coords - origin).double() / stride).long()
    positions = cells.flip(1)  # (x, y) -> (row, col)
    flat = positions[:, 0] * (int(positions[:, 1].max()) + 1) + positions[:, 1]
    if torch.unique(flat).numel() != flat.numel():
        raise BagFileError(
            f"{path}: patches overlap on the grid with cell size {stride} px at level 0 (two patches map to one "
            "cell); give the real patch stride with `patch_stride`"
        )
    return positions


def read_bag(path: str | Path, patch_stride: int | None = None, features_key: str = "features") -> SlideBag:
    """Load and validate one bag file (see the module docstring).

    Args:
        path: The h5 file.
        patch_stride: Level-0 patch stride (None: from the attributes, else detected from the coordinates).
        features_key: The features dataset's name.
    """
    path = Path(path)
    if not path.is_file():
        raise BagFileError(f"{path}: feature file not found")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise BagFileError(f"{path}: not a readable HDF5 file ({err})") from err
    with handle:
        missing = [k for k in (features_key, "coords") if k not in handle]
        if missing:
            raise BagFileError(f"{path}: missing dataset(s) {missing}; found {sorted(handle.keys())} "
                               f"(a CLAM/TRIDENT bag needs '{features_key}' (N, D) and 'coords' (N, 2))")
        features = np.asarray(handle[features_key][()])
        coords = np.asarray(handle["coords"][()])
        attrs = {**_attrs(handle), **_attrs(handle["coords"])}
    if features.ndim == 3 and features.shape[0] == 1:  # some extractors store (1, N, D)
        features = features[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if features.ndim != 2:
        raise BagFileError(f"{path}: '{features_key}' must be 2-D (N, D), got shape {features.shape}")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise BagFileError(f"{path}: 'coords' must be (N, 2) level-0 (x, y), got shape {coords.shape}")
    if features.shape[0] != coords.shape[0]:
        raise BagFileError(f"{path}: {features.shape[0]} feature rows but {coords.shape[0]} coords rows")
    if features.shape[0] == 0:
        raise BagFileError(f"{path}: empty bag (0 patches)")
    if not np.issubdtype(features.dtype, np.floating):
        raise BagFileError(f"{path}: '{features_key}' must be floating point, got {features.dtype}")
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise BagFileError(f"{path}: {rows.size} patch(es) have NaN/inf features (first rows {rows[:5].tolist()})")
    if not np.isfinite(coords).all() or (coords < 0).any():
        raise BagFileError(f"{path}: 'coords' has negative or non-finite values")
    coords = coords.astype(np.int64)
    unique, counts = np.unique(coords, axis=0, return_counts=True)
    if (counts > 1).any():
        dup = unique[counts > 1]
        raise BagFileError(
            f"{path}: {int((counts > 1).sum())} duplicate coordinate(s), e.g. (x, y) = {dup[0].tolist()}")

    if patch_stride is not None:
        stride, source = int(patch_stride), "config"
    elif (stride := stride_from_attrs(attrs)) is not None:
        source = "attrs"
    else:
        stride, source = detect_stride(coords) or 1, "detected"
        log.info("%s: no patch size attributes; grid cell = %d px at level 0, detected from the coordinates",
                 path, stride)
    if stride <= 0:
        raise BagFileError(f"{path}: patch stride must be positive, got {stride} (from {source})")
    coords_t = torch.from_numpy(coords)
    return SlideBag(path, torch.from_numpy(features.astype(np.float32, copy=False)), coords_t, stride, source,
                    coords_to_positions(coords_t, stride, path), attrs)


def feature_dims(paths, features_key: str = "features") -> dict[Path, int]:
    """Feature size D of each bag, read from the h5 dataset's shape only (no features are loaded).

    Args:
        paths: Bag files.
        features_key: The features dataset's name.

    Returns:
        {path: D}.

    Raises:
        BagFileError: A file is missing, not HDF5, lacks the dataset or has no feature axis (names the file).
    """
    dims = {}
    for path in map(Path, paths):
        try:
            with h5py.File(path, "r") as handle:
                if features_key not in handle:
                    raise BagFileError(f"{path}: missing dataset '{features_key}'; found {sorted(handle.keys())}")
                shape = handle[features_key].shape
        except OSError as err:
            raise BagFileError(f"{path}: not a readable HDF5 file ({err})") from err
        if len(shape) not in (2, 3):
            raise BagFileError(f"{path}: '{features_key}' must be (N, D), got shape {shape}")
        dims[path] = int(shape[-1])
    return dims


def check_feature_dim(paths, in_dim: int, option: str = "--model.init_args.in_dim",
                      features_key: str = "features") -> None:
    """Fail before training when any bag's feature size differs from the model's input size.

    Args:
        paths: Bag files.
        in_dim: The feature size the model expects.
        option: The setting that fixes it, named in the message.
        features_key: The features dataset's name.

    Raises:
        BagFileError: Naming every bag whose size differs, grouped by size, and the value to give `option`.
    """
    dims = feature_dims(paths, features_key)
    wrong: dict[int, list[str]] = {}
    for path, dim in dims.items():
        if dim != in_dim:
            wrong.setdefault(dim, []).append(str(path))
    if wrong:
        found = "; ".join(f"{dim}-d: {', '.join(files[:5])}{f' and {len(files) - 5} more' if len(files) > 5 else ''}"
                          for dim, files in sorted(wrong.items()))
        hint = f"set {option} {next(iter(wrong))}" if len(set(dims.values())) == 1 else \
            "the bags have different feature sizes: extract them all with one backbone"
        raise BagFileError(f"the model expects {in_dim}-d features but {sum(map(len, wrong.values()))} of "
                           f"{len(dims)} bag(s) differ ({found}); {hint}")
