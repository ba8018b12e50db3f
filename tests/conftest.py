from pathlib import Path

import numpy as np
import pytest
import torch

SLIDE_SIZE = (1024, 768)  # level-0 (width, height) of the generated test slides
TISSUE_BOX = (256, 128, 512, 512)  # (x, y, width, height) of the tissue on them, level 0
SCN_OFFSET = (200, 150)  # level-0 corner of the scanned image inside a generated Leica slide (not tile-aligned)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def write_test_slide(path: Path, mpp: float | None = 0.5, magnification: float | None = None,
                     tissue_box: tuple[int, int, int, int] = TISSUE_BOX) -> Path:
    """A tiny pyramidal slide that OpenSlide opens: real IHC tissue (scikit-image's sample) on near-white glass.

    Three tiled levels (downsamples 1, 2, 4) in successive TIFF directories, the reduced ones flagged as such, as
    OpenSlide's readers expect. The suffix picks the format:

    - `.svs`: Aperio (µm/px and objective power in its description: `openslide.mpp-x`, `openslide.objective-power`);
    - `.scn`: Leica, the scanned image placed at `SCN_OFFSET` inside a larger slide, so OpenSlide reports it as the
      scanned region (`openslide.bounds-*`); µm/px in the resolution tags, objective power 20;
    - anything else: a generic tiled TIFF (µm/px in the resolution tags, no objective power, no bounds).
    """
    import tifffile
    from skimage.data import immunohistochemistry
    from skimage.transform import resize

    x, y, w, h = tissue_box
    image = np.full((SLIDE_SIZE[1], SLIDE_SIZE[0], 3), 242, np.uint8)
    tissue = immunohistochemistry()
    if tissue.shape[:2] != (h, w):
        tissue = (resize(tissue, (h, w), anti_aliasing=True) * 255).astype(np.uint8)
    image[y:y + h, x:x + w] = tissue
    aperio = path.suffix.lower() == ".svs"
    description = None
    if aperio:
        fields = [f"AppMag = {magnification:g}"] if magnification else []
        fields += [f"MPP = {mpp:g}"] if mpp else []
        description = "Aperio Image Library v12.0.0\r\n" + "|".join([f"{SLIDE_SIZE[0]}x{SLIDE_SIZE[1]}", *fields])
    if path.suffix.lower() == ".scn":
        description = _leica_description(mpp or 0.5)
    with tifffile.TiffWriter(path) as tif:
        for level in range(3):
            pixels = image[::2 ** level, ::2 ** level]
            extra = {}
            if mpp and not aperio:
                per_cm = 1e4 / (mpp * 2 ** level)
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(pixels, tile=(128, 128), photometric="rgb", compression="deflate", metadata=None,
                      description=description if level == 0 else None, subfiletype=1 if level else 0, **extra)
    return path


def _leica_description(mpp: float) -> str:
    """Leica SCN's ImageDescription: one brightfield main image (our three levels) inside a larger collection, in
    nanometre "clicks" as OpenSlide's Leica reader expects."""
    nm = round(mpp * 1000)  # clicks per level-0 pixel
    width, height = SLIDE_SIZE
    dims = "".join(f'<dimension sizeX="{width >> r}" sizeY="{height >> r}" r="{r}" ifd="{r}"/>' for r in range(3))
    return (f'<?xml version="1.0" encoding="utf-8"?><scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">'
            f'<collection name="tiny" sizeX="{(width + 2 * SCN_OFFSET[0]) * nm}" '
            f'sizeY="{(height + 2 * SCN_OFFSET[1]) * nm}"><image name="main"><device model="test" version="1"/>'
            f'<pixels sizeX="{width}" sizeY="{height}">{dims}</pixels>'
            f'<view sizeX="{width * nm}" sizeY="{height * nm}" offsetX="{SCN_OFFSET[0] * nm}" '
            f'offsetY="{SCN_OFFSET[1] * nm}" spacingZ="0"/><scanSettings><objectiveSettings><objective>20</objective>'
            '</objectiveSettings><illuminationSettings><illuminationSource>brightfield</illuminationSource>'
            '</illuminationSettings></scanSettings></image></collection></scn>')


@pytest.fixture(scope="session")
def test_slide(tmp_path_factory) -> Path:
    """A generic tiled TIFF at 0.5 µm/px (see `write_test_slide`), written once per session; do not modify it."""
    return write_test_slide(tmp_path_factory.mktemp("slides") / "tiny.tif")


@pytest.fixture
def make_test_slide(tmp_path):
    """`make_test_slide(name, **kwargs)` writes `write_test_slide(tmp_path / name, **kwargs)`."""
    def make(name: str, **kwargs) -> Path:
        return write_test_slide(tmp_path / name, **kwargs)
    return make
