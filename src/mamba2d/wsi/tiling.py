"""Tiling a slide at a target resolution: which level to read, the patch size at level 0, and the tissue tiles.

Tiles are non-overlapping squares on a level-0 grid with stride = `patch_size_level0` (the patch size times the
ratio of target to level-0 resolution). The grid starts at the scanned region's top-left corner
(`openslide.bounds-x/-y`, or (0, 0) when the slide records no bounds) and every tile lies wholly inside that region:
tiles that would cross its right or bottom edge are not made. A tile is kept when at least `tissue_threshold` of
its area is tissue on the thumbnail mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .slide import SlideError, level0_mpp, read_thumbnail, slide_info
from .tissue import tissue_mask

log = logging.getLogger(__name__)


@dataclass
class TilingPlan:
    """Where the tissue tiles of one slide are and how to read them.

    Args:
        coords: (N, 2) int64 level-0 (x, y) of each tile's top-left corner.
        patch_size: Pixels of the (square) patch given to the backbone.
        patch_size_level0: Level-0 pixels a patch covers (= grid stride).
        read_level: Pyramid level the tiles are read from.
        read_size: Pixels read at `read_level` (resized to `patch_size`).
        read_downsample: Downsample of `read_level` from level 0.
        read_level_dims: (width, height) of `read_level`.
        mpp: µm/px of the patches.
        magnification: Objective power of the patches: the target magnification, or 10 µm / `mpp`.
        level0_mpp: The slide's level-0 µm/px used.
        mpp_source: Where `level0_mpp` came from (see `mamba2d.wsi.slide.level0_mpp`).
        level0_magnification: The slide's objective power, or its equivalent 10 µm / `level0_mpp`.
        bounds: Scanned region (x, y, width, height) at level 0 that the tiles lie in.
        mask: Thumbnail tissue mask.
        thumbnail: The RGB thumbnail the mask was computed on.
        thumbnail_downsample: Level-0 pixels per thumbnail pixel.
    """

    coords: np.ndarray
    patch_size: int
    patch_size_level0: int
    read_level: int
    read_size: int
    read_downsample: float
    read_level_dims: tuple[int, int]
    mpp: float
    magnification: float
    level0_mpp: float
    mpp_source: str
    level0_magnification: float
    bounds: tuple[int, int, int, int]
    mask: np.ndarray
    thumbnail: np.ndarray
    thumbnail_downsample: float


def target_scale(info, mpp: float | None = None, magnification: float | None = None,
                 assume_mpp: float | None = None, override_mpp: bool = False
                 ) -> tuple[float, float, float, str]:
    """How many level-0 pixels make one output pixel at the target resolution.

    A target magnification on a slide that records its objective power uses the ratio of the two powers (what
    the scanner reports), unless `override_mpp` asks for `assume_mpp`; otherwise the target becomes 10 µm /
    magnification and is compared with the level-0 µm/px resolved by `mamba2d.wsi.slide.level0_mpp`.

    Args:
        info: The slide (`SlideInfo`).
        mpp: Target µm/px (default 0.5 when no magnification is given).
        magnification: Target objective power instead of `mpp`.
        assume_mpp: Level-0 µm/px for slides without `openslide.mpp-x` (see `level0_mpp`).
        override_mpp: Use `assume_mpp` even when the slide records its own µm/px.

    Returns:
        (level-0 pixels per output pixel, output µm/px, level-0 µm/px, its source).

    Raises:
        ValueError: Both `mpp` and `magnification` are given.
        SlideError: The slide's resolution is unknown (names the slide).
    """
    if mpp is not None and magnification is not None:
        raise ValueError("give a target mpp or a target magnification, not both")
    if magnification is not None and info.magnification and not override_mpp:
        scale = info.magnification / magnification
        base, source = level0_mpp(info, assume_mpp)
        return scale, base * scale, base, source
    target = 0.5 if mpp is None and magnification is None else (mpp if mpp is not None else 10.0 / magnification)
    base, source = level0_mpp(info, assume_mpp, override_mpp)
    return target / base, target, base, source


def tile_grid(bounds: tuple[int, int, int, int], size0: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left x and y of the non-overlapping tiles of `size0` level-0 pixels that fit wholly inside `bounds`.

    Args:
        bounds: (x, y, width, height) of the scanned region at level 0.
        size0: Tile side at level 0.

    Returns:
        (xs, ys), int64 arrays starting at the region's corner.
    """
    x, y, width, height = bounds
    return (np.arange(x, x + width - size0 + 1, size0, dtype=np.int64),
            np.arange(y, y + height - size0 + 1, size0, dtype=np.int64))


def select_tissue_tiles(mask: np.ndarray, downsample: float, bounds: tuple[int, int, int, int], size0: int,
                        tissue_threshold: float) -> np.ndarray:
    """Level-0 corners of the grid tiles inside `bounds` whose tissue fraction on `mask` reaches the threshold.

    Args:
        mask: (h, w) bool tissue mask of the whole level-0 image at `downsample`.
        downsample: Level-0 pixels per mask pixel.
        bounds: (x, y, width, height) of the scanned region at level 0; no tile leaves it.
        size0: Tile side at level 0.
        tissue_threshold: Smallest tissue fraction (0-1) of a kept tile.

    Returns:
        (N, 2) int64 level-0 (x, y) in raster order (row by row).
    """
    xs, ys = tile_grid(bounds, size0)
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), np.int64)
    # Tissue fraction of each tile's footprint on the mask, from a summed-area table.
    table = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0 = np.clip(np.floor(xs / downsample).astype(int), 0, mask.shape[1] - 1)
    x1 = np.clip(np.ceil((xs + size0) / downsample).astype(int), x0 + 1, mask.shape[1])
    y0 = np.clip(np.floor(ys / downsample).astype(int), 0, mask.shape[0] - 1)
    y1 = np.clip(np.ceil((ys + size0) / downsample).astype(int), y0 + 1, mask.shape[0])
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    inside = (table[y1][:, x1] - table[y0][:, x1] - table[y1][:, x0] + table[y0][:, x0]) / area
    rows, cols = np.nonzero(inside >= tissue_threshold)
    return np.stack([xs[cols], ys[rows]], axis=1).astype(np.int64)


def plan_tiles(slide, path: str | Path, patch_size: int = 224, mpp: float | None = None,
               magnification: float | None = None, tissue_threshold: float = 0.5, thumbnail_size: int | None = None,
               assume_mpp: float | None = None, override_mpp: bool = False,
               bounds: tuple[int, int, int, int] | None = None) -> TilingPlan:
    """Tiles of `patch_size` px at the target resolution, inside the scanned region, with enough tissue.

    The tissue mask is computed on a thumbnail of `thumbnail_size` px (default: 16 px per patch side, between 512
    and 4096 px), enough to resolve a tile's footprint without paying for a full-resolution mask.

    Args:
        slide: An open `openslide.OpenSlide`.
        path: The slide file, for messages.
        patch_size: Side of the patch given to the backbone, in pixels at the target resolution.
        mpp: Target µm/px (default 0.5).
        magnification: Target objective power instead of `mpp`.
        tissue_threshold: Smallest tissue fraction (0-1) of a kept tile.
        thumbnail_size: Largest side of the thumbnail the tissue mask is computed on.
        assume_mpp: Level-0 µm/px for slides without `openslide.mpp-x`; see `mamba2d.wsi.slide` for the order.
        override_mpp: Use `assume_mpp` even when the slide records its own µm/px.
        bounds: Scanned region (x, y, width, height) at level 0 instead of the slide's `openslide.bounds-*`.

    Returns:
        A `TilingPlan`.

    Raises:
        SlideError: Unknown resolution, or a patch larger than the scanned region (names the slide).
    """
    info = slide_info(slide, path)
    scale, out_mpp, base_mpp, source = target_scale(info, mpp, magnification, assume_mpp, override_mpp)
    region = info.bounds if bounds is None else tuple(int(v) for v in bounds)
    size0 = int(round(patch_size * scale))
    if size0 < 1 or size0 > min(region[2], region[3]):
        raise SlideError(f"{path}: a {patch_size}px patch at {out_mpp:.3f} µm/px covers {size0} level-0 px; the "
                         f"scanned region (x, y, width, height) is {region}")
    level = slide.get_best_level_for_downsample(scale)
    read_size = max(int(round(size0 / info.level_downsamples[level])), 1)

    if thumbnail_size is None:
        thumbnail_size = int(np.clip(16 * max(info.width, info.height) / size0, 512, 4096))
    thumbnail, ds = read_thumbnail(slide, thumbnail_size, path)
    mask = tissue_mask(thumbnail)
    coords = select_tissue_tiles(mask, ds, region, size0, tissue_threshold)
    log.info("%s: level-0 %.4f µm/px (from %s), %d px patches at %.3f µm/px cover %d level-0 px, read at level %d",
             path, base_mpp, source, patch_size, out_mpp, size0, level)
    return TilingPlan(coords, patch_size, size0, level, read_size, float(info.level_downsamples[level]),
                      tuple(slide.level_dimensions[level]), out_mpp,
                      float(magnification) if magnification is not None else 10.0 / out_mpp, base_mpp, source,
                      info.magnification or 10.0 / base_mpp,
                      region, mask, thumbnail, ds)
