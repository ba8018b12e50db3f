"""Heatmaps: a MIL model's per-patch scores drawn over the slide thumbnail.

Scores are shown as percentile ranks within the slide (as CLAM does), so slides with sharp and flat attention are
both readable; `normalize="minmax"` shows the raw range instead. Cells without a patch stay uncoloured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.bags import read_bag
from .slide import open_slide, read_thumbnail


def normalise_scores(scores: np.ndarray, mode: str = "rank") -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if mode == "rank":
        return (np.argsort(np.argsort(scores)) + 0.5) / len(scores)
    if mode == "minmax":
        span = scores.max() - scores.min()
        return (scores - scores.min()) / span if span > 0 else np.full_like(scores, 0.5)
    raise ValueError(f"heatmap: normalize must be 'rank' or 'minmax', got {mode!r}")


def score_canvas(shape: tuple[int, int], coords: np.ndarray, values: np.ndarray, patch_size_level0: int,
                 downsample: float) -> np.ndarray:
    """(h, w) float image, NaN where no patch lies, else the value of the patch covering the pixel."""
    canvas = np.full(shape, np.nan)
    size = patch_size_level0 / downsample
    for (x, y), value in zip(coords, values):
        x0, y0 = int(x / downsample), int(y / downsample)
        canvas[y0:max(int(np.ceil(y0 + size)), y0 + 1), x0:max(int(np.ceil(x0 + size)), x0 + 1)] = value
    return canvas


def render_heatmap(slide_path: str | Path, coords: np.ndarray, scores: np.ndarray, patch_size_level0: int,
                   out_png: str | Path, thumbnail_size: int = 2048, alpha: float = 0.45, cmap: str = "jet",
                   normalize: str = "rank", title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig, ax = plt.subplots(figsize=(10, 10 * height / width + 0.6), dpi=max(100, int(width / 10)))
    ax.imshow(thumbnail)
    image = ax.imshow(np.ma.masked_invalid(canvas), cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title or Path(slide_path).name)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01,
                 label="attention (percentile within slide)" if normalize == "rank" else "attention")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, bbox_inches="tight")
    plt.close(fig)
    return out_png


@torch.inference_mode()
def model_scores(checkpoint: str | Path, features_h5: str | Path, patch_stride: int | None = None,
                 device: str = "cpu") -> tuple[np.ndarray, np.ndarray, int, torch.Tensor]:
    """Run a trained SlideMIL checkpoint on one bag: (coords, scores, patch stride at level 0, logits)."""
    from ..tasks.mil import SlideMIL

    # weights=None: the checkpoint holds the trained weights; the starting ones need not exist any more
    module = SlideMIL.load_from_checkpoint(str(checkpoint), map_location=device, weights=None).eval()
    bag = read_bag(features_h5, patch_stride)
    out = module.model(bag.features.to(device), bag.positions.to(device))
    return bag.coords.numpy(), out.scores.float().cpu().numpy(), bag.stride, out.logits.float().cpu()
