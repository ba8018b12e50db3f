"""ERF tool: the area-ratio measure, the gradient map on a model whose receptive field is known, and the command."""

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from skimage import data as skdata
from skimage.io import imsave

import mamba2d  # noqa: F401  (registers the backbones)
from mamba2d.analysis import erf
from mamba2d.cli import main


def test_area_ratio_of_known_maps():
    point = np.zeros((9, 9))
    point[4, 4] = 1.0
    assert erf.area_ratios(point) == {t: 1 / 81 for t in erf.THRESHOLDS}
    uniform = np.ones((9, 9))
    # smallest centred square holding a share t of a uniform map: side 5 for 0.2 and 0.3 (25/81 >= 0.3), 7 for 0.5,
    # the whole image for 0.99.
    assert erf.area_ratios(uniform) == {0.2: 25 / 81, 0.3: 25 / 81, 0.5: 49 / 81, 0.99: 1.0}
    with pytest.raises(ValueError, match="all zero"):
        erf.area_ratios(np.zeros((4, 4)))


def test_area_ratio_is_measured_around_the_true_centre():
    # The centre of a 64-pixel side lies between pixels 31 and 32: the central 2 x 2 pixels are the smallest
    # centred square, and a square around pixel 32 (3 x 3) would be neither centred nor smallest.
    centre = np.zeros((64, 64))
    centre[31:33, 31:33] = 1.0
    assert erf.area_ratios(centre) == {t: 4 / 64**2 for t in erf.THRESHOLDS}
    # Around another centre (a receptive field centred on pixel (15.5, 15.5)), clipped to the image.
    quadrant = np.zeros((64, 64))
    quadrant[15:17, 15:17] = 1.0
    quadrant[0, 0] = 1.0
    assert erf.area_ratios(quadrant, (0.5,), centre=(15.5, 15.5)) == {0.5: 4 / 64**2}
    assert erf.area_ratios(quadrant, (0.99,), centre=(15.5, 15.5)) == {0.99: 32**2 / 64**2}


def test_probe_geometry_of_a_real_backbone():
    # vmamba2d_nano: stem 2 x (3x3, stride 2, pad 1) and three (3x3, stride 2, pad 1) downsamplings: unit j of the
    # final map is centred on pixel 32j. At 64 px (2 x 2 map) unit 1 is centred on pixel 32, half a pixel from the
    # image centre; at 160 px (5 x 5) the middle unit 2 is centred on pixel 64, unit 3 on 96: the centre 79.5 is
    # nearer 64 (unit 2), and the ratios are measured around 64, not 79.5.
    model = timm.create_model("vmamba2d_nano")
    probe = erf.locate_probe(model, (64, 64))
    assert probe.traced and probe.stride == (32, 32) and probe.offset == (0, 0) and probe.final == (2, 2)
    assert probe.unit == (1, 1) and probe.centre == (32, 32)
    wide = erf.locate_probe(model, (160, 160))
    assert wide.unit == (2, 2) and wide.centre == (64, 64)
    assert "receptive field centred on pixel (64, 64)" in wide.describe((160, 160))


class Patchify32(nn.Module):
    """A stride-32 patchify stem as the whole backbone: at 64 pixels its final map is 2 x 2, each unit sees one
    quadrant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 32, stride=32, bias=False)
        nn.init.constant_(self.conv.weight, 0.5)

    def forward_features(self, x):
        return self.conv(x)


def test_erf_at_size_64_is_measured_around_the_probed_unit():
    # At 64 pixels the last map of a stride-32 patchify stem is 2 x 2 and each unit sees one quadrant: the ratios
    # must be measured around the probed unit's own centre (a quadrant's centre), not around the image's.
    probe = erf.locate_probe(Patchify32(), (64, 64))
    assert (probe.stride, probe.offset) == ((32, 32), (15.5, 15.5))
    contribution = erf.erf_map(Patchify32(), torch.rand(2, 3, 64, 64), probe=probe)
    assert erf.centroid(contribution) == pytest.approx(probe.centre)
    # uniform over the probed unit's 32 x 32 quadrant: at t = 0.99 the square around its centre is that quadrant
    assert erf.area_ratios(contribution, (0.99,), probe.centre) == {0.99: pytest.approx(0.25)}


def test_erf_of_a_real_backbone_at_size_64_reaches_every_quadrant():
    torch.manual_seed(0)
    images, _ = erf.load_images(None, 64)
    contribution = erf.erf_map(timm.create_model("vmamba2d_nano"), torch.from_numpy(images[:2]).permute(0, 3, 1, 2))
    share = contribution / contribution.sum()
    assert min(share[r:r + 32, c:c + 32].sum() for r in (0, 32) for c in (0, 32)) > 0.05


class ThreeByThree(nn.Module):
    """One 3x3 convolution: the central output sees exactly the 3x3 input window around the centre."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        nn.init.constant_(self.conv.weight, 0.5)

    def forward_features(self, x):
        return self.conv(x)


def test_erf_map_is_the_known_receptive_field():
    images = torch.rand(3, 3, 11, 11)
    contribution = erf.erf_map(ThreeByThree(), images)
    expected = np.zeros((11, 11))
    expected[4:7, 4:7] = 4 * 3 * 0.5  # 4 output channels, 3 input channels, weight 0.5
    np.testing.assert_allclose(contribution, expected)
    assert erf.area_ratios(contribution)[0.99] == pytest.approx(9 / 121)


def test_default_images_are_bundled_photos():
    images, names = erf.load_images(None, 16)
    assert images.shape == (len(erf.DEFAULT_IMAGES), 16, 16, 3) and names == list(erf.DEFAULT_IMAGES)
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_command_writes_figure_and_numbers(tmp_path, capsys):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    imsave(image_dir / "cat.png", skdata.chelsea())
    imsave(image_dir / "coffee.png", skdata.coffee())
    out = tmp_path / "erf.png"
    assert main(["erf", "--models", "[vmamba2d_nano.digits]", "--images", str(image_dir), "--size", "64",
                 "--random_init", "true", "--out", str(out), "--progress", "false"]) == 0
    printed = capsys.readouterr().out
    numbers = json.loads(out.with_suffix(".json").read_text())
    with Image.open(out) as figure:
        pixels = np.asarray(figure.convert("L"))
    assert figure.size[0] > 300 and figure.size[1] > 300
    assert pixels.std() > 10  # not blank
    assert all("probe: unit (1, 1) of the 2x2 final map, receptive field centred on pixel (32, 32)" in r["probe"]
               for r in numbers["results"])
    assert numbers["images"] == ["cat.png", "coffee.png"] and numbers["thresholds"] == [0.2, 0.3, 0.5, 0.99]
    assert [r["init"] for r in numbers["results"]] == ["random", "trained"]
    for result in numbers["results"]:
        ratios = [result["ratios"][str(t)] if str(t) in result["ratios"] else result["ratios"][t]
                  for t in (0.2, 0.3, 0.5, 0.99)]
        assert all(0 < a <= b <= 1 for a, b in zip(ratios, ratios[1:]))
        assert f"{ratios[-1]:.4f}" in printed
