"""Opening whole-slide images with OpenSlide: clear errors naming the file, resolution metadata, thumbnails."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")


class SlideError(ValueError):
    """A slide file that cannot be read or lacks what was asked of it; the message names the file."""


@dataclass
class SlideInfo:
    path: Path
    width: int  # level-0 pixels
    height: int
    mpp: float | None  # level-0 micrometres per pixel
    magnification: float | None  # objective power of level 0
    level_downsamples: tuple[float, ...]


def open_slide(path: str | Path):
    """An `openslide.OpenSlide` for `path`, or SlideError saying why not."""
    import openslide

    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: slide file not found")
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError, OSError) as err:
        raise SlideError(f"{path}: cannot read this slide with OpenSlide ({type(err).__name__}: {err})") from err


def slide_info(slide, path: str | Path) -> SlideInfo:
    props = slide.properties
    mpp = props.get("openslide.mpp-x")
    power = props.get("openslide.objective-power")
    width, height = slide.dimensions
    return SlideInfo(Path(path), width, height, float(mpp) if mpp else None, float(power) if power else None,
                     tuple(float(d) for d in slide.level_downsamples))


def level0_mpp(info: SlideInfo, assume_mpp: float | None = None) -> float:
    """Level-0 µm/px from the slide, else from its objective power (10 µm/px / power, the usual 20x = 0.5),
    else `assume_mpp`; SlideError when none is known."""
    if info.mpp:
        return info.mpp
    if info.magnification:
        return 10.0 / info.magnification
    if assume_mpp:
        return assume_mpp
    raise SlideError(f"{info.path}: no resolution metadata (openslide.mpp-x, objective-power); pass --assume-mpp")


def read_thumbnail(slide, max_size: int, path: str | Path) -> tuple[np.ndarray, float]:
    """RGB thumbnail (h, w, 3) uint8 no larger than max_size, and its downsample from level 0."""
    try:
        image = np.asarray(slide.get_thumbnail((max_size, max_size)).convert("RGB"))
    except Exception as err:  # OpenSlide raises OpenSlideError or PIL errors on damaged tiles
        raise SlideError(f"{path}: cannot read a thumbnail ({type(err).__name__}: {err})") from err
    return image, slide.dimensions[0] / image.shape[1]
