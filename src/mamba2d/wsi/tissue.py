"""Tissue detection on a low-resolution image: Otsu on the saturation channel (stained tissue is coloured, glass and
background are grey or white), excluding near-white pixels, then small specks and holes removed with scikit-image."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects


def tissue_mask(rgb: np.ndarray, min_saturation: float = 0.05, max_brightness: float = 0.9,
                min_object_fraction: float = 1e-3) -> np.ndarray:
    """Boolean mask of tissue in an RGB image.

    Otsu picks the saturation threshold; `min_saturation` floors it (an empty or all-tissue image has no second
    mode) and pixels brighter than `max_brightness` (HSV value) never count as tissue. Connected components and
    holes (4-connected) smaller than `min_object_fraction` of the image are removed and filled
    (`skimage.morphology.remove_small_objects` / `remove_small_holes`).

    Args:
        rgb: (h, w, 3) uint8 image (a slide thumbnail); a fourth (alpha) channel is ignored.
        min_saturation: Lowest saturation threshold (0-1).
        max_brightness: Brightest HSV value (0-1) that can still be tissue.
        min_object_fraction: Smallest tissue piece or hole kept, as a fraction of the image's pixels.

    Returns:
        (h, w) bool mask, True on tissue.
    """
    hsv = rgb2hsv(rgb[..., :3])
    saturation = ndimage.median_filter(hsv[..., 1], size=5)
    threshold = max(threshold_otsu(saturation), min_saturation) if np.ptp(saturation) > 0 else 1.0
    mask = (saturation > threshold) & (hsv[..., 2] < max_brightness)
    padded = np.pad(mask, 2, mode="edge")  # so the closing does not erode tissue that touches the border
    mask = ndimage.binary_closing(padded, structure=np.ones((5, 5), bool))[2:-2, 2:-2]
    # scikit-image removes pieces of at most max_size pixels; ours keeps pieces of min_size pixels and more.
    max_size = max(int(min_object_fraction * mask.size), 1) - 1
    mask = remove_small_objects(mask, max_size=max_size, connectivity=1)
    return remove_small_holes(mask, max_size=max_size, connectivity=1)
