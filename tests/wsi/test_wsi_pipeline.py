"""Slide pipeline on the real Aperio slide: extract (tissue tiles -> CLAM h5), DataModule, 2DMambaMIL, heatmap."""

import lightning
import matplotlib.image
import numpy as np
import openslide
import pytest
import timm
import torch
from conftest import SHARED_DATA
from mil_helpers import write_table
from skimage.data import immunohistochemistry

from mamba2d.data.bags import read_bag
from mamba2d.data.slides import SlideBagDataModule
from mamba2d.models.mil import MambaMIL2D
from mamba2d.tasks.mil import SlideMIL
from mamba2d.wsi.cli import main as wsi_main
from mamba2d.wsi.extract import find_slides
from mamba2d.wsi.slide import SlideError, open_slide
from mamba2d.wsi.tiling import plan_tiles
from mamba2d.wsi.tissue import tissue_mask

SLIDE = SHARED_DATA / "CMU-1-Small-Region.svs"
needs_slide = pytest.mark.skipif(not SLIDE.is_file(), reason=f"real slide not found at {SLIDE} (../shared/data)")


@needs_slide
def test_real_slide_extract_datamodule_forward_and_heatmap(tmp_path, capsys):
    out = tmp_path / "features"
    assert wsi_main(["extract", str(SLIDE), "--out", str(out), "--backbone", "resnet18", "--batch-size", "32",
                     "--mpp", "0.5", "--patch-size", "224"]) == 0
    h5 = out / "CMU-1-Small-Region.h5"
    bag = read_bag(h5)
    slide = openslide.OpenSlide(str(SLIDE))
    width, height = slide.dimensions
    size0 = bag.attrs["patch_size_level0"]
    assert bag.attrs["patch_size"] == 224 and bag.attrs["mpp"] == 0.5 and bag.attrs["magnification"] == 20
    assert size0 == round(224 * 0.5 / 0.499) and bag.stride == size0 and bag.stride_source == "attrs"
    n = len(bag.features)
    assert n > 0 and bag.features.shape == (n, 512) and torch.isfinite(bag.features).all()
    assert (bag.coords >= 0).all()
    assert (bag.coords[:, 0] + size0 <= width).all() and (bag.coords[:, 1] + size0 <= height).all()
    # White background is excluded: kept tiles are darker than the slide's tiles that were left out.
    grid = [(x, y) for y in range(0, height - size0 + 1, size0) for x in range(0, width - size0 + 1, size0)]
    kept = {tuple(c) for c in bag.coords.tolist()}
    assert 0 < n < len(grid)

    def brightness(xy):
        return np.asarray(slide.read_region(xy, 0, (size0, size0)).convert("L"))[::8, ::8].mean()

    kept_mean = np.mean([brightness(xy) for xy in grid if xy in kept])
    dropped = [brightness(xy) for xy in grid if xy not in kept]
    assert kept_mean < np.mean(dropped) - 15 and max(dropped) > 225  # pure-background tiles exist and were dropped
    capsys.readouterr()

    # Runs again: the finished bag is skipped.
    wsi_main(["extract", str(SLIDE), "--out", str(out), "--backbone", "resnet18"])
    assert "skipped" in capsys.readouterr().out

    # Through the DataModule and a 2DMambaMIL forward pass.
    csv = write_table(tmp_path / "labels.csv", ["slide_id", "label", "split"], [["CMU-1-Small-Region", "1", "test"]])
    data = SlideBagDataModule(str(out), str(csv), class_names=["0", "1"])
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert batch["positions"].max(0).values.tolist() <= [height // size0, width // size0]
    torch.manual_seed(0)
    module = SlideMIL("mamba_mil_2d", in_dim=512, num_classes=2, model_args={"num_layers": 2})
    assert isinstance(module.model, MambaMIL2D)
    with torch.no_grad():
        result = module(batch)
    assert torch.isfinite(result.logits).all() and result.scores.shape == (n,)

    # Heatmap of that model's attention over the thumbnail.
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    png = tmp_path / "heatmap.png"
    assert wsi_main(["heatmap", "--slide", str(SLIDE), "--features", str(h5), "--ckpt", str(ckpt), "--out", str(png),
                     "--thumbnail-size", "512"]) == 0
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 200
    assert f"{n} patches" in capsys.readouterr().out


@needs_slide
def test_tiling_at_a_target_magnification(tmp_path):
    slide = open_slide(SLIDE)
    plan_20x = plan_tiles(slide, SLIDE, patch_size=224, magnification=20)
    plan_10x = plan_tiles(slide, SLIDE, patch_size=224, magnification=10)
    plan_mpp = plan_tiles(slide, SLIDE, patch_size=256, mpp=1.0)
    assert plan_20x.patch_size_level0 == 224 and plan_10x.patch_size_level0 == 448
    assert plan_mpp.patch_size_level0 == round(256 * 1.0 / 0.499) and plan_mpp.mpp == 1.0
    assert 0 < len(plan_10x.coords) < len(plan_20x.coords)
    assert plan_10x.read_level == 0 and plan_10x.read_size == 448  # one level: read at level 0, then resize


def test_tissue_mask_finds_stained_tissue_and_not_white_glass():
    tissue = immunohistochemistry()  # real IHC tissue, 512 x 512
    canvas = np.full((768, 768, 3), 245, np.uint8)
    canvas[128:640, 128:640] = tissue
    mask = tissue_mask(canvas)
    assert mask[128:640, 128:640].mean() > 0.5
    assert not mask[:100].any() and not mask[:, :100].any() and not mask[-100:].any()
    assert not tissue_mask(np.full((64, 64, 3), 250, np.uint8)).any()  # blank glass: no tissue


def test_corrupt_or_missing_slides_give_errors_naming_the_file(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(SlideError, match="broken.svs: cannot read this slide with OpenSlide"):
        wsi_main(["extract", str(bad), "--out", str(tmp_path / "out"), "--backbone", "resnet18"])
    with pytest.raises(SlideError, match="nope.svs: no such slide file or folder"):
        find_slides([tmp_path / "nope.svs"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlideError, match="no slide files"):
        find_slides([empty])


@pytest.mark.parametrize("command", ["extract", "heatmap", "splits", "kfold", "spatial-benchmark"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        wsi_main([command, "--help"])
    assert info.value.code == 0 and f"mamba2d-wsi {command}" in capsys.readouterr().out


def test_patch_encoder_weights_load_through_the_zoo(tmp_path):
    """--checkpoint takes any layout the zoo reads, loads strictly (classifier included), then drops the head."""
    from mamba2d import zoo
    from mamba2d.wsi.extract import load_backbone

    path = zoo.fetch("vmamba2d_nano.digits")
    embedder = load_backbone("vmamba2d_nano", checkpoint=str(path), device="cpu")
    assert embedder.dim == 256 and embedder.model.num_classes == 0
    reference = zoo.load("vmamba2d_nano.digits")
    torch.testing.assert_close(embedder.model.patch_embed[0].weight, reference.patch_embed[0].weight)
    other = tmp_path / "other.safetensors"
    zoo.export(timm.create_model("vmamba_tiny", num_classes=3).state_dict(), other)
    with pytest.raises(zoo.CheckpointMismatch, match=f"{other} does not fit VSSM: .*shape mismatches"):
        load_backbone("vmamba2d_nano", checkpoint=str(other), device="cpu")
