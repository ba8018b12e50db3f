"""Tissue detection on a low-resolution image: Otsu on the saturation channel (stained tissue is coloured, glass and
background are grey or white), excluding near-white pixels, then small holes and specks removed."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu


def _drop_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def tissue_mask(rgb: np.ndarray, min_saturation: float = 0.05, max_brightness: float = 0.9,
                min_object_fraction: float = 1e-3) -> np.ndarray:
    """Boolean (h, w) mask of tissue in an RGB uint8 image.

    Otsu picks the saturation threshold; `min_saturation` floors it (an empty or all-tissue image has no second
    mode) and pixels brighter than `max_brightness` (HSV value) never count as tissue. Components (and holes)
    smaller than `min_object_fraction` of the image are removed (filled).
    """
    hsv = rgb2hsv(rgb[..., :3])
    saturation = ndimage.median_filter(hsv[..., 1], size=5)
    threshold = max(threshold_otsu(saturation), min_saturation) if np.ptp(saturation) > 0 else 1.0
    mask = (saturation > threshold) & (hsv[..., 2] < max_brightness)
    padded = np.pad(mask, 2, mode="edge")  # so the closing does not erode tissue that touches the border
    mask = ndimage.binary_closing(padded, structure=np.ones((5, 5), bool))[2:-2, 2:-2]
    min_size = max(int(min_object_fraction * mask.size), 1)
    mask = _drop_small_components(mask, min_size)
    return ~_drop_small_components(~mask, min_size)
