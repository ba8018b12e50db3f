"""Opening whole-slide images with OpenSlide: clear errors naming the file, resolution, scanned region, thumbnails.

Level-0 resolution (µm/px) is resolved in one documented order (`level0_mpp`):

1. `override_mpp=True` with `assume_mpp`: the given value, whatever the slide says (for files whose metadata is
   known to be wrong, e.g. a 72 dpi placeholder written by an export tool);
2. the slide's own `openslide.mpp-x` (and `openslide.mpp-y`);
3. `assume_mpp`, when the slide has no µm/px metadata;
4. 10 µm / `openslide.objective-power` (the usual 20x = 0.5 µm/px), when neither of the above exists;
5. otherwise `SlideError` naming the slide and saying to pass `assume_mpp`.

The scanned region is `openslide.bounds-x/-y/-width/-height` when the format records it (MIRAX, Leica, Ventana,
...); it is the whole level-0 image otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
BOUNDS_KEYS = ("openslide.bounds-x", "openslide.bounds-y", "openslide.bounds-width", "openslide.bounds-height")


class SlideError(ValueError):
    """A slide file that cannot be read or lacks what was asked of it; the message names the file."""


@dataclass
class SlideInfo:
    """What tiling needs to know about a slide, read from its OpenSlide properties.

    Args:
        path: The slide file.
        width: Level-0 width in pixels.
        height: Level-0 height in pixels.
        mpp: Level-0 µm/px from `openslide.mpp-x`, None when the slide does not record it.
        magnification: Objective power of level 0 (`openslide.objective-power`), None when not recorded.
        level_downsamples: Downsample of every pyramid level relative to level 0.
        bounds: Scanned region (x, y, width, height) in level-0 pixels; the whole image when not recorded.
    """

    path: Path
    width: int
    height: int
    mpp: float | None
    magnification: float | None
    level_downsamples: tuple[float, ...]
    bounds: tuple[int, int, int, int]


def open_slide(path: str | Path):
    """Open a slide with OpenSlide.

    Args:
        path: Any format OpenSlide reads (svs, tif, ndpi, mrxs, scn, ...).

    Returns:
        An `openslide.OpenSlide`.

    Raises:
        SlideError: The file is missing or OpenSlide cannot read it (the message names the file and the cause).
    """
    import openslide

    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: slide file not found")
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError, OSError) as err:
        raise SlideError(f"{path}: cannot read this slide with OpenSlide ({type(err).__name__}: {err})") from err


def scanned_bounds(properties: Mapping[str, str], width: int, height: int, path: str | Path = "<slide>"
                   ) -> tuple[int, int, int, int]:
    """The scanned region from OpenSlide's `openslide.bounds-*` properties, clipped to the level-0 image.

    Args:
        properties: The slide's property mapping (`OpenSlide.properties`).
        width: Level-0 width.
        height: Level-0 height.
        path: The slide, for error messages.

    Returns:
        (x, y, width, height) in level-0 pixels; (0, 0, width, height) when the slide records no bounds.

    Raises:
        SlideError: Only some of the four properties exist, or they describe an empty region.
    """
    present = [key for key in BOUNDS_KEYS if key in properties]
    if not present:
        return 0, 0, width, height
    if len(present) != len(BOUNDS_KEYS):
        raise SlideError(f"{path}: incomplete scanned-region properties: has {present}, needs all of {BOUNDS_KEYS}")
    x, y, w, h = (int(properties[key]) for key in BOUNDS_KEYS)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, width), min(y + h, height)
    if x1 <= x0 or y1 <= y0:
        raise SlideError(f"{path}: scanned region {(x, y, w, h)} lies outside the {width} x {height} image")
    return x0, y0, x1 - x0, y1 - y0


def slide_info(slide, path: str | Path) -> SlideInfo:
    """Read a slide's size, resolution, pyramid and scanned region.

    Args:
        slide: An open `openslide.OpenSlide` (or an object with the same `properties`, `dimensions` and
            `level_downsamples`).
        path: The slide file, for messages.

    Returns:
        A `SlideInfo`.
    """
    props = slide.properties
    mpp = props.get("openslide.mpp-x")
    power = props.get("openslide.objective-power")
    width, height = slide.dimensions
    return SlideInfo(Path(path), width, height, float(mpp) if mpp else None, float(power) if power else None,
                     tuple(float(d) for d in slide.level_downsamples), scanned_bounds(props, width, height, path))


def level0_mpp(info: SlideInfo, assume_mpp: float | None = None, override_mpp: bool = False) -> tuple[float, str]:
    """Level-0 µm/px in the order of the module docstring, and where it came from.

    Args:
        info: The slide.
        assume_mpp: µm/px to use when the slide has no `openslide.mpp-x`; with `override_mpp`, always.
        override_mpp: Let `assume_mpp` replace the slide's own metadata.

    Returns:
        (µm/px, source), source being "override", "metadata", "assume_mpp" or "objective_power".

    Raises:
        SlideError: No resolution is known (names the slide), or `override_mpp` without `assume_mpp`.
    """
    if override_mpp:
        if not assume_mpp:
            raise SlideError(f"{info.path}: override_mpp needs assume_mpp (the µm/px to use instead of the slide's)")
        return float(assume_mpp), "override"
    if info.mpp:
        return info.mpp, "metadata"
    if assume_mpp:
        return float(assume_mpp), "assume_mpp"
    if info.magnification:
        return 10.0 / info.magnification, "objective_power"
    raise SlideError(f"{info.path}: no resolution metadata (openslide.mpp-x, openslide.objective-power); "
                     "pass assume_mpp (--assume-mpp) with the level-0 µm/px")


def read_thumbnail(slide, max_size: int, path: str | Path) -> tuple[np.ndarray, float]:
    """A thumbnail of the whole level-0 image.

    Args:
        slide: An open `openslide.OpenSlide`.
        max_size: Largest side of the thumbnail in pixels.
        path: The slide file, for messages.

    Returns:
        RGB thumbnail (h, w, 3) uint8 and its downsample from level 0.

    Raises:
        SlideError: OpenSlide cannot decode the thumbnail.
    """
    try:
        image = np.asarray(slide.get_thumbnail((max_size, max_size)).convert("RGB"))
    except Exception as err:  # OpenSlide raises OpenSlideError or PIL errors on damaged tiles
        raise SlideError(f"{path}: cannot read a thumbnail ({type(err).__name__}: {err})") from err
    return image, slide.dimensions[0] / image.shape[1]
