"""Tiling a slide at a target resolution: which level to read, the patch size at level 0, and the tissue tiles.

Tiles are non-overlapping squares on a level-0 grid with stride = `patch_size_level0` (the patch size times the
ratio of target to level-0 resolution), kept when at least `tissue_threshold` of their area is tissue on the
thumbnail mask. Tiles that would cross the slide's right or bottom edge are not made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .slide import SlideError, level0_mpp, read_thumbnail, slide_info
from .tissue import tissue_mask


@dataclass
class TilingPlan:
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y) of each tile's top-left corner
    patch_size: int  # pixels of the patch given to the backbone
    patch_size_level0: int  # level-0 pixels a patch covers (= grid stride)
    read_level: int
    read_size: int  # pixels read at read_level (resized to patch_size)
    mpp: float  # µm/px of the patches
    magnification: float  # equivalent objective power of the patches (10 µm / mpp)
    mask: np.ndarray  # thumbnail tissue mask
    thumbnail_downsample: float


def target_scale(info, mpp: float | None, magnification: float | None, assume_mpp: float | None) -> tuple[float, float]:
    """(level-0 pixels per output pixel, output µm/px) for a target µm/px or magnification (default 0.5 µm/px)."""
    if mpp is not None and magnification is not None:
        raise ValueError("give a target mpp or a target magnification, not both")
    if magnification is not None:
        if info.magnification:  # objective power is what the scanner reports: use the ratio directly
            scale = info.magnification / magnification
            return scale, level0_mpp(info, assume_mpp) * scale if (info.mpp or assume_mpp) else 10.0 / magnification
        mpp = 10.0 / magnification
    mpp = 0.5 if mpp is None else mpp
    return mpp / level0_mpp(info, assume_mpp), mpp


def plan_tiles(slide, path: str | Path, patch_size: int = 224, mpp: float | None = None,
               magnification: float | None = None, tissue_threshold: float = 0.5, thumbnail_size: int | None = None,
               assume_mpp: float | None = None) -> TilingPlan:
    """Tiles of `patch_size` px at the target resolution whose tissue fraction reaches `tissue_threshold`.

    The tissue mask is computed on a thumbnail of `thumbnail_size` px (default: 16 px per patch side, between 512
    and 4096 px), enough to resolve a tile's footprint without paying for a full-resolution mask.
    """
    info = slide_info(slide, path)
    scale, out_mpp = target_scale(info, mpp, magnification, assume_mpp)
    size0 = int(round(patch_size * scale))
    if size0 < 1 or size0 > min(info.width, info.height):
        raise SlideError(f"{path}: a {patch_size}px patch at {out_mpp:.3f} µm/px covers {size0} level-0 px; the slide "
                         f"is {info.width} x {info.height}")
    level = slide.get_best_level_for_downsample(scale)
    read_size = max(int(round(size0 / info.level_downsamples[level])), 1)

    if thumbnail_size is None:
        thumbnail_size = int(np.clip(16 * max(info.width, info.height) / size0, 512, 4096))
    thumbnail, ds = read_thumbnail(slide, thumbnail_size, path)
    mask = tissue_mask(thumbnail)
    xs = np.arange(0, info.width - size0 + 1, size0)
    ys = np.arange(0, info.height - size0 + 1, size0)
    # Tissue fraction of each tile's footprint on the thumbnail, from a summed-area table.
    table = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0 = np.clip(np.floor(xs / ds).astype(int), 0, mask.shape[1] - 1)
    x1 = np.clip(np.ceil((xs + size0) / ds).astype(int), x0 + 1, mask.shape[1])
    y0 = np.clip(np.floor(ys / ds).astype(int), 0, mask.shape[0] - 1)
    y1 = np.clip(np.ceil((ys + size0) / ds).astype(int), y0 + 1, mask.shape[0])
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    inside = (table[y1][:, x1] - table[y0][:, x1] - table[y1][:, x0] + table[y0][:, x0]) / area
    rows, cols = np.nonzero(inside >= tissue_threshold)
    coords = np.stack([xs[cols], ys[rows]], axis=1).astype(np.int64)
    return TilingPlan(coords, patch_size, size0, level, read_size, out_mpp, 10.0 / out_mpp, mask, ds)
