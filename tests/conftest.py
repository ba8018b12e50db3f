from pathlib import Path

import numpy as np
import pytest
import torch

SLIDE_SIZE = (1024, 768)  # level-0 (width, height) of the generated test slides
TISSUE_BOX = (256, 128, 512, 512)  # (x, y, width, height) of the tissue on them, level 0


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
    OpenSlide's readers expect. `.svs` makes an Aperio file (µm/px and objective power in its description, read
    as `openslide.mpp-x` and `openslide.objective-power`); any other suffix a generic tiled TIFF (µm/px in the
    resolution tags, no objective power).
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
