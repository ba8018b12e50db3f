"""ERF tool: the area-ratio measure, the gradient map on a model whose receptive field is known, and the command."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from skimage import data as skdata
from skimage.io import imsave

from mamba2d.analysis import erf


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
    assert erf.main(["--models", "vmamba2d_nano.digits", "--images", str(image_dir), "--size", "64",
                     "--random-init", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert out.stat().st_size > 10_000
    assert numbers["images"] == ["cat.png", "coffee.png"] and numbers["thresholds"] == [0.2, 0.3, 0.5, 0.99]
    assert [r["init"] for r in numbers["results"]] == ["random", "trained"]
    for result in numbers["results"]:
        ratios = [result["ratios"][str(t)] if str(t) in result["ratios"] else result["ratios"][t]
                  for t in (0.2, 0.3, 0.5, 0.99)]
        assert all(0 < a <= b <= 1 for a, b in zip(ratios, ratios[1:]))
        assert f"{ratios[-1]:.4f}" in printed
