"""Slide pipeline on generated pyramidal slides: tiling (scanned region, resolution precedence), tissue, CLAM /
TRIDENT h5 attributes, resume, previews, then the DataModule, 2DMambaMIL and the heatmap on the extracted bag."""

import h5py
import lightning
import matplotlib.image
import numpy as np
import openslide
import pytest
import timm
import torch
from conftest import SCN_OFFSET, SLIDE_SIZE, TISSUE_BOX
from mil_helpers import write_bag, write_table
from PIL import Image
from skimage.data import immunohistochemistry

from mamba2d.checkpoints import CheckpointError
from mamba2d.data.bags import read_bag
from mamba2d.data.slides import SlideBagDataModule
from mamba2d.models.mil import MambaMIL2D
from mamba2d.tasks.mil import SlideMIL
from mamba2d.wsi import tissue
from mamba2d.wsi.extract import bag_is_complete, extract_features, find_slides, throughput_per_device
from mamba2d.wsi.heatmap import BOUNDS_COLOUR, TILE_COLOUR, TISSUE_COLOUR, model_scores, render_heatmap
from mamba2d.wsi.slide import SlideError, SlideInfo, level0_mpp, open_slide, scanned_bounds, slide_info
from mamba2d.wsi.tiling import plan_tiles, select_tissue_tiles
from mamba2d.wsi.tissue import tissue_mask

# 32 px patches at 1 µm/px on the 0.5 µm/px slides: 64 level-0 px per tile, read from level 1 without resizing.
SMALL = {"backbone": "resnet18", "patch_size": 32, "mpp": 1.0, "batch_size": 32, "accelerator": "cpu",
         "progress": False}


def test_generated_slide_is_a_pyramid_that_openslide_reads(test_slide):
    slide = openslide.OpenSlide(str(test_slide))
    assert slide.level_count == 3 and slide.level_downsamples == (1.0, 2.0, 4.0)
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert float(slide.properties["openslide.mpp-x"]) == 0.5


def test_tiles_hold_tissue_and_lie_on_the_level0_grid(test_slide):
    slide = open_slide(test_slide)
    plan = plan_tiles(slide, test_slide, patch_size=32, mpp=1.0)
    assert (plan.patch_size_level0, plan.read_level, plan.read_size, plan.mpp_source) == (64, 1, 32, "metadata")
    assert plan.bounds == (0, 0, 1024, 768)
    x, y, w, h = TISSUE_BOX
    coords = plan.coords
    assert len(coords) > 0 and (coords % 64 == 0).all()
    # Kept tiles overlap the tissue; the glass around it is dropped (at most a border tile's width away).
    assert (coords[:, 0] >= x - 64).all() and (coords[:, 0] < x + w).all()
    assert (coords[:, 1] >= y - 64).all() and (coords[:, 1] < y + h).all()
    assert len(coords) >= 0.5 * (w // 64) * (h // 64)
    plan_20x = plan_tiles(slide, test_slide, patch_size=32, magnification=20)  # 0.5 µm/px = level 0
    assert (plan_20x.patch_size_level0, plan_20x.read_level) == (32, 0) and len(plan_20x.coords) > len(coords)


def test_tiling_stays_inside_the_scanned_region(test_slide):
    slide = open_slide(test_slide)
    whole = plan_tiles(slide, test_slide, patch_size=32, mpp=1.0)
    bounds = (300, 200, 360, 300)  # cuts through the tissue; not a multiple of the tile size
    plan = plan_tiles(slide, test_slide, patch_size=32, mpp=1.0, bounds=bounds)
    bx, by, bw, bh = bounds
    assert plan.bounds == bounds and len(plan.coords) > 0
    assert (plan.coords[:, 0] >= bx).all() and (plan.coords[:, 1] >= by).all()
    assert (plan.coords[:, 0] + 64 <= bx + bw).all() and (plan.coords[:, 1] + 64 <= by + bh).all()
    assert ((plan.coords - [bx, by]) % 64 == 0).all()  # the grid starts at the region's corner
    assert len(plan.coords) < len(whole.coords)
    # The same selection from the mask alone: a tile crossing the region's edge is never made.
    mask = np.ones((96, 128), bool)
    corners = select_tissue_tiles(mask, 8.0, (10, 20, 190, 130), 64, 0.5)  # a third column would end at 202
    assert sorted(map(tuple, corners.tolist())) == [(10, 20), (10, 84), (74, 20), (74, 84)]
    with pytest.raises(SlideError, match="tiny.tif: a 32px patch .* scanned region"):
        plan_tiles(slide, test_slide, patch_size=32, mpp=1.0, bounds=(0, 0, 50, 50))


def test_leica_slide_scanned_region_from_openslide_bounds_the_tiles_and_the_preview(make_test_slide, tmp_path):
    path = make_test_slide("scanned.scn")  # Leica: the scanned image sits at SCN_OFFSET inside a larger slide
    slide = openslide.OpenSlide(str(path))
    region = (*SCN_OFFSET, *SLIDE_SIZE)
    assert slide.properties["openslide.vendor"] == "leica"
    assert slide_info(slide, path).bounds == region
    plan = plan_tiles(slide, path, patch_size=32, mpp=1.0)
    assert plan.bounds == region and len(plan.coords) > 0
    x, y = SCN_OFFSET
    assert ((plan.coords - [x, y]) % 64 == 0).all()  # the grid starts at the region's corner, not at (0, 0)
    assert (plan.coords >= [x, y]).all() and (plan.coords + 64 <= [x + SLIDE_SIZE[0], y + SLIDE_SIZE[1]]).all()
    # The same tissue tiles as on the generic TIFF holding the same image, shifted by the region's corner.
    tiff = make_test_slide("same.tif")
    shifted = plan_tiles(openslide.OpenSlide(str(tiff)), tiff, patch_size=32, mpp=1.0).coords + [x, y]
    assert sorted(map(tuple, plan.coords.tolist())) == sorted(map(tuple, shifted.tolist()))
    (summary,) = extract_features([path], tmp_path, **SMALL)
    with h5py.File(summary["h5"], "r") as handle:
        assert handle["coords"].attrs["bounds"].tolist() == list(region)
    preview = np.asarray(Image.open(summary["preview"]).convert("RGB"))
    assert (preview == BOUNDS_COLOUR).all(-1).sum() > 100  # the scanned region is drawn


class PropertySlide:
    """What OpenSlide gives a format that records its scanned region (MIRAX, Leica, Ventana): the properties."""

    def __init__(self, properties):
        self.properties, self.dimensions, self.level_downsamples = properties, (1000, 800), (1.0, 4.0)


def test_scanned_region_is_read_from_openslide_bounds_properties(test_slide):
    bounds = {"openslide.bounds-x": "100", "openslide.bounds-y": "50", "openslide.bounds-width": "600",
              "openslide.bounds-height": "2000"}
    info = slide_info(PropertySlide({"openslide.mpp-x": "0.25", **bounds}), "scan.mrxs")
    assert info.bounds == (100, 50, 600, 750)  # clipped to the image
    assert slide_info(openslide.OpenSlide(str(test_slide)), test_slide).bounds == (0, 0, 1024, 768)
    with pytest.raises(SlideError, match="scan.mrxs: incomplete scanned-region properties"):
        scanned_bounds({"openslide.bounds-x": "1"}, 10, 10, "scan.mrxs")
    with pytest.raises(SlideError, match="scan.mrxs: scanned region .* outside"):
        scanned_bounds({**bounds, "openslide.bounds-x": "5000"}, 1000, 800, "scan.mrxs")


def test_resolution_precedence_metadata_then_assume_then_objective_power(make_test_slide, test_slide):
    """Order (documented in mamba2d.wsi.slide): override > openslide.mpp-x > assume_mpp > objective power."""
    def info(path):
        return slide_info(openslide.OpenSlide(str(path)), path)

    tagged = info(test_slide)  # generic TIFF with 0.5 µm/px resolution tags
    assert level0_mpp(tagged) == (0.5, "metadata")
    assert level0_mpp(tagged, assume_mpp=0.25) == (0.5, "metadata")  # the slide's metadata wins
    assert level0_mpp(tagged, assume_mpp=0.25, override_mpp=True) == (0.25, "override")
    aperio_power_only = info(make_test_slide("power.svs", mpp=None, magnification=40))
    assert aperio_power_only.magnification == 40 and aperio_power_only.mpp is None
    assert level0_mpp(aperio_power_only) == (0.25, "objective_power")
    assert level0_mpp(aperio_power_only, assume_mpp=0.26) == (0.26, "assume_mpp")  # yours beats a nominal power
    bare = make_test_slide("bare.tif", mpp=None)
    assert level0_mpp(info(bare), assume_mpp=0.5) == (0.5, "assume_mpp")
    with pytest.raises(SlideError, match="bare.tif: no resolution metadata .* pass assume_mpp"):
        level0_mpp(info(bare))
    with pytest.raises(SlideError, match="bare.tif: no resolution metadata"):
        plan_tiles(openslide.OpenSlide(str(bare)), bare, patch_size=32, mpp=1.0)
    with pytest.raises(SlideError, match="tiny.tif: override_mpp needs assume_mpp"):
        level0_mpp(tagged, override_mpp=True)
    # Through tiling: the override changes the footprint of a patch, the ignored assume_mpp does not.
    slide = open_slide(test_slide)
    assert plan_tiles(slide, test_slide, 32, mpp=1.0, assume_mpp=0.25).patch_size_level0 == 64
    assert plan_tiles(slide, test_slide, 32, mpp=1.0, assume_mpp=0.25, override_mpp=True).patch_size_level0 == 128
    # A target magnification uses the ratio of objective powers when the slide records its power.
    power_slide = make_test_slide("power20.svs", mpp=None, magnification=20)
    plan = plan_tiles(openslide.OpenSlide(str(power_slide)), power_slide, 32, magnification=10)
    assert (plan.patch_size_level0, plan.mpp, plan.magnification, plan.mpp_source) == (64, 1.0, 10.0,
                                                                                       "objective_power")
    assert SlideInfo  # the dataclass is public: tiling code may build one directly


def test_tissue_mask_finds_stained_tissue_and_not_white_glass():
    tissue_image = immunohistochemistry()  # real IHC tissue, 512 x 512
    canvas = np.full((768, 768, 3), 245, np.uint8)
    canvas[128:640, 128:640] = tissue_image
    mask = tissue_mask(canvas)
    assert mask[128:640, 128:640].mean() > 0.5
    assert not mask[:100].any() and not mask[:, :100].any() and not mask[-100:].any()
    assert not tissue_mask(np.full((64, 64, 3), 250, np.uint8)).any()  # blank glass: no tissue


def test_tissue_mask_drops_specks_and_fills_holes_with_scikit_image():
    canvas = np.full((200, 200, 3), 245, np.uint8)
    canvas[40:160, 40:160] = (150, 60, 120)  # a stained block ...
    canvas[90:96, 90:96] = 245  # ... with a 36-px hole (under 0.1 % of 40,000 px)
    canvas[10:14, 180:184] = (150, 60, 120)  # a 16-px speck
    mask = tissue_mask(canvas, min_object_fraction=1e-3)
    assert mask[90:96, 90:96].all() and not mask[10:14, 180:184].any()
    kept = tissue_mask(canvas, min_object_fraction=1e-5)  # a 0-px threshold keeps both
    assert not kept[92:94, 92:94].any() and kept[11:13, 181:183].all()
    assert not hasattr(tissue, "_drop_small_components")  # scikit-image's functions replace our own


def test_h5_attributes_are_clam_and_trident_compatible(test_slide, tmp_path):
    (summary,) = extract_features([test_slide], tmp_path / "features", **SMALL)
    h5 = tmp_path / "features" / "tiny.h5"
    with h5py.File(h5, "r") as handle:
        coords, attrs = handle["coords"][()], dict(handle["coords"].attrs)
        assert handle["features"].shape == (len(coords), 512) and handle["features"].dtype == np.float32
    # CLAM (create_patches_fp.py): patch_size pixels read at patch_level, downsample of that level.
    assert (attrs["patch_size"], attrs["patch_level"]) == (32, 1)
    assert attrs["downsample"].tolist() == [2.0, 2.0]
    assert attrs["level_dim"].tolist() == attrs["downsampled_level_dim"].tolist() == [512, 384]
    assert attrs["name"] == "tiny" and attrs["save_path"] == str(tmp_path / "features")
    assert attrs["patch_size"] * attrs["downsample"][0] == attrs["patch_size_level0"] == 64
    # TRIDENT (extract_tissue_coords): the level-0 footprint and magnifications.
    assert attrs["level0_magnification"] == 20.0 and attrs["target_magnification"] == 10.0
    assert attrs["overlap"] == 0 and attrs["savetodir"] == str(tmp_path / "features")
    assert attrs["target_patch_size"] == 32 and attrs["mpp"] == 1.0 and attrs["mpp_source"] == "metadata"
    assert attrs["bounds"].tolist() == [0, 0, 1024, 768] and attrs["backbone"] == "resnet18"
    bag = read_bag(h5)
    assert (bag.stride, bag.stride_source) == (64, "attrs") and len(bag.features) == summary["patches"]
    # Our reader still reads a bag carrying CLAM's attributes only.
    clam = write_bag(tmp_path / "clam.h5", bag.features.numpy(), coords, patch_size=32, patch_level=1,
                     downsample=np.array([2.0, 2.0]), downsampled_level_dim=np.array([512, 384]),
                     level_dim=np.array([512, 384]), name="clam", save_path=str(tmp_path))
    assert read_bag(clam).stride == 64 and torch.equal(read_bag(clam).positions, bag.positions)


def test_extraction_resumes_redoes_damaged_bags_and_names_bad_slides(make_test_slide, tmp_path, caplog):
    slides = [make_test_slide(f"s{i}.tif") for i in range(3)]
    out = tmp_path / "features"
    first = extract_features(slides, out, **SMALL)
    assert [s["skipped"] for s in first] == [False] * 3 and all(bag_is_complete(out / f"s{i}.h5") for i in range(3))
    assert set(throughput_per_device(first)) == {0} and throughput_per_device(first)[0]["patches_per_s"] > 0
    stamp = (out / "s0.h5").stat().st_mtime_ns
    # A truncated bag (a copy cut short) and a leftover temporary file from a crash.
    data = (out / "s1.h5").read_bytes()
    (out / "s1.h5").write_bytes(data[: len(data) // 2])
    (out / "s2.h5").unlink()
    (out / "s2.h5.part").write_bytes(b"half")
    assert not bag_is_complete(out / "s1.h5")
    second = extract_features(slides, out, **SMALL)
    assert [s["skipped"] for s in second] == [True, False, False]
    assert (out / "s0.h5").stat().st_mtime_ns == stamp and not (out / "s2.h5.part").exists()
    assert all(bag_is_complete(out / f"s{i}.h5") for i in range(3))
    with pytest.raises(SlideError, match="s0.h5: an existing bag was made with other settings .*backbone"):
        extract_features(slides, out, **{**SMALL, "backbone": "resnet10t"})
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(SlideError, match="1 slide.* failed .*broken.svs: cannot read this slide with OpenSlide"):
        extract_features([*slides, bad], out, **SMALL)


def test_preview_png_shows_tissue_contour_and_kept_tiles(test_slide, tmp_path):
    (summary,) = extract_features([test_slide], tmp_path, **SMALL)
    png = tmp_path / "previews" / "tiny.png"
    assert summary["preview"] == str(png) and png.is_file()
    image = np.asarray(Image.open(png).convert("RGB"))
    thumbnail = openslide.OpenSlide(str(test_slide)).get_thumbnail((512, 512))  # 16 px per patch side -> 512
    assert image.shape == (thumbnail.height, thumbnail.width, 3) == (384, 512, 3)
    assert image.std() > 10  # not blank
    tiles = (image == TILE_COLOUR).all(-1)
    contour = (image == TISSUE_COLOUR).all(-1)
    assert tiles.sum() > 100 and contour.sum() > 100 and not (image == BOUNDS_COLOUR).all(-1).any()
    x, y, w, h = (v // 2 for v in TISSUE_BOX)  # thumbnail pixels (downsample 2)
    rows, cols = np.nonzero(tiles | contour)
    assert rows.min() >= y - 34 and rows.max() < y + h + 34 and cols.min() >= x - 34 and cols.max() < x + w + 34


def test_extracted_bag_through_datamodule_model_and_heatmap(test_slide, tmp_path):
    out = tmp_path / "features"
    (summary,) = extract_features([test_slide], out, **SMALL)
    n = summary["patches"]
    csv = write_table(tmp_path / "labels.csv", ["slide_id", "label", "split"], [["tiny", "1", "test"]])
    data = SlideBagDataModule(str(out), str(csv), class_names=["0", "1"])
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert batch["positions"].shape == (n, 2) and batch["positions"].max(0).values.tolist() <= [768 // 64,
                                                                                               1024 // 64]
    torch.manual_seed(0)
    module = SlideMIL("mamba_mil_2d", in_dim=512, num_classes=2, model_args={"num_layers": 2}).eval()
    assert isinstance(module.model, MambaMIL2D)
    with torch.no_grad():
        result = module(batch)
    assert torch.isfinite(result.logits).all() and result.scores.shape == (n,)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    coords, scores, stride, logits = model_scores(ckpt, out / "tiny.h5")
    assert stride == 64 and scores.shape == (n,) and torch.allclose(logits, result.logits.float())
    png = render_heatmap(test_slide, coords, scores, stride, tmp_path / "heatmap.png", thumbnail_size=512)
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300 and image[..., :3].std() > 0.05


def test_heatmap_names_a_truncated_or_garbage_checkpoint(tmp_path):
    module = SlideMIL("abmil", in_dim=8, num_classes=2)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match=rf"{bad}.*corrupt or not a checkpoint") as error:
            model_scores(bad, tmp_path / "unused.h5")
        assert "weights_only" not in str(error.value)


def test_corrupt_or_missing_slides_give_errors_naming_the_file(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(SlideError, match="broken.svs: cannot read this slide with OpenSlide"):
        open_slide(bad)
    with pytest.raises(SlideError, match="nope.svs: no such slide file or folder"):
        find_slides([tmp_path / "nope.svs"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlideError, match="no slide files"):
        find_slides([empty])


def test_patch_encoder_weights_load_through_the_zoo(tmp_path):
    """A checkpoint in any layout the zoo reads, loads strictly (classifier included), then drops the head."""
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

