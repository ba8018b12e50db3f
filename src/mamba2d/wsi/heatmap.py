"""Pictures over the slide thumbnail: a MIL model's per-patch scores (heatmap) and the tiling preview.

Heatmap scores are shown as percentile ranks within the slide (as CLAM does), so slides with sharp and flat
attention are both readable; `normalize="minmax"` shows the raw range instead. Cells without a patch stay
uncoloured. The tiling preview shows what extraction kept: the tissue contour, the kept tiles and, when the slide
records one, the scanned region.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from skimage.measure import find_contours

from ..checkpoints import check_checkpoint_file
from ..data.bags import read_bag
from .slide import open_slide, read_thumbnail

TISSUE_COLOUR = (0, 90, 255)  # tissue contour
TILE_COLOUR = (0, 200, 0)  # kept tiles
BOUNDS_COLOUR = (255, 0, 0)  # scanned region


def render_tiling_preview(plan, out_png: str | Path, title: str | None = None) -> Path:
    """Draw a tiling plan on its thumbnail, as CLAM's stitched previews do: tissue contour in blue, kept tiles in
    green, the scanned region in red when it is smaller than the image. The PNG has the thumbnail's size.

    Args:
        plan: A `mamba2d.wsi.tiling.TilingPlan` (it holds the thumbnail, the mask and the tiles).
        out_png: The PNG to write (folders are made).
        title: Text written in the top-left corner (e.g. the slide name); None for none.

    Returns:
        The PNG's path.
    """
    image = Image.fromarray(plan.thumbnail).convert("RGB")
    draw = ImageDraw.Draw(image)
    ds = plan.thumbnail_downsample
    for contour in find_contours(np.pad(plan.mask, 1).astype(np.float32), 0.5):
        points = [(float(c) - 1, float(r) - 1) for r, c in contour]  # undo the padding; (row, col) -> (x, y)
        if len(points) > 1:
            draw.line(points, fill=TISSUE_COLOUR, width=2)
    size = plan.patch_size_level0 / ds
    for x, y in plan.coords:
        draw.rectangle([x / ds, y / ds, x / ds + size - 1, y / ds + size - 1], outline=TILE_COLOUR)
    bx, by, bw, bh = plan.bounds
    if (bx, by) != (0, 0) or bw * bh < (image.width * ds) * (image.height * ds) * 0.999:
        draw.rectangle([bx / ds, by / ds, (bx + bw) / ds - 1, (by + bh) / ds - 1], outline=BOUNDS_COLOUR, width=2)
    if title:
        draw.text((4, 4), f"{title}: {len(plan.coords)} tiles", fill=(0, 0, 0))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_png)
    return out_png


def normalise_scores(scores: np.ndarray, mode: str = "rank") -> np.ndarray:
    """Scores mapped to [0, 1] for colouring.

    Args:
        scores: One score per patch.
        mode: "rank" (percentile rank within the slide) or "minmax" (linear between the smallest and largest).

    Returns:
        float64 array of the same length.

    Raises:
        ValueError: An unknown mode.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if mode == "rank":
        return (np.argsort(np.argsort(scores)) + 0.5) / len(scores)
    if mode == "minmax":
        span = scores.max() - scores.min()
        return (scores - scores.min()) / span if span > 0 else np.full_like(scores, 0.5)
    raise ValueError(f"heatmap: normalize must be 'rank' or 'minmax', got {mode!r}")


def score_canvas(shape: tuple[int, int], coords: np.ndarray, values: np.ndarray, patch_size_level0: int,
                 downsample: float) -> np.ndarray:
    """Paint each patch's value over its footprint on a thumbnail-sized canvas.

    Args:
        shape: (h, w) of the thumbnail.
        coords: (N, 2) level-0 (x, y) of the patches.
        values: (N,) value per patch.
        patch_size_level0: Patch side at level 0.
        downsample: Level-0 pixels per thumbnail pixel.

    Returns:
        (h, w) float image, NaN where no patch lies, else the value of the patch covering the pixel.
    """
    canvas = np.full(shape, np.nan)
    size = patch_size_level0 / downsample
    for (x, y), value in zip(coords, values):
        x0, y0 = int(x / downsample), int(y / downsample)
        canvas[y0:max(int(np.ceil(y0 + size)), y0 + 1), x0:max(int(np.ceil(x0 + size)), x0 + 1)] = value
    return canvas


def render_heatmap(slide_path: str | Path, coords: np.ndarray, scores: np.ndarray, patch_size_level0: int,
                   out_png: str | Path, thumbnail_size: int = 2048, alpha: float = 0.45, cmap: str = "jet",
                   normalize: str = "rank", title: str | None = None) -> Path:
    """Draw per-patch scores over a slide's thumbnail (matplotlib Figure API) and save a PNG.

    Args:
        slide_path: The slide file.
        coords: (N, 2) level-0 (x, y) of the patches.
        scores: (N,) score per patch.
        patch_size_level0: Patch side at level 0 (the bag's grid stride).
        out_png: The PNG to write (folders are made).
        thumbnail_size: Largest side of the thumbnail in pixels.
        alpha: Opacity of the scores over the thumbnail.
        cmap: Matplotlib colour map name.
        normalize: "rank" (percentile within the slide) or "minmax".
        title: Figure title (default: the slide's file name).

    Returns:
        The PNG's path.

    Raises:
        ValueError: `coords` and `scores` differ in length.
    """
    from matplotlib.figure import Figure

    coords, scores = np.asarray(coords), np.asarray(scores)
    if len(coords) != len(scores):
        raise ValueError(f"heatmap: {len(coords)} coordinates but {len(scores)} scores")
    slide = open_slide(slide_path)
    try:
        thumbnail, downsample = read_thumbnail(slide, thumbnail_size, slide_path)
    finally:
        slide.close()
    canvas = score_canvas(thumbnail.shape[:2], coords, normalise_scores(scores, normalize), patch_size_level0,
                          downsample)
    height, width = thumbnail.shape[:2]
    fig = Figure(figsize=(10, 10 * height / width + 0.6), dpi=max(100, int(width / 10)))
    ax = fig.subplots()
    ax.imshow(thumbnail)
    image = ax.imshow(np.ma.masked_invalid(canvas), cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title or Path(slide_path).name)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01,
                 label="attention (percentile within slide)" if normalize == "rank" else "attention")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, bbox_inches="tight")
    return out_png


@torch.inference_mode()
def model_scores(checkpoint: str | Path, features_h5: str | Path, patch_stride: int | None = None,
                 device: str = "cpu") -> tuple[np.ndarray, np.ndarray, int, torch.Tensor]:
    """Run a trained SlideMIL checkpoint on one bag.

    Args:
        checkpoint: A `SlideMIL` Lightning checkpoint.
        features_h5: The slide's feature bag.
        patch_stride: Grid cell at level 0 instead of the bag's attributes.
        device: Where the model runs.

    Returns:
        (coords, scores, patch stride at level 0, bag logits).

    Raises:
        CheckpointError: `checkpoint` is missing, truncated or not a checkpoint (named before Lightning reads it).
    """
    from ..tasks.mil import SlideMIL

    check_checkpoint_file(checkpoint)
    # weights=None: the checkpoint holds the trained weights; the starting ones need not exist any more
    module = SlideMIL.load_from_checkpoint(str(checkpoint), map_location=device, weights=None).eval()
    bag = read_bag(features_h5, patch_stride)
    out = module.model(bag.features.to(device), bag.positions.to(device))
    return bag.coords.numpy(), out.scores.float().cpu().numpy(), bag.stride, out.logits.float().cpu()
