"""Slide -> CLAM-format feature bag: tissue tiles read with OpenSlide, embedded in batches by a timm / zoo backbone.

Output `<out_dir>/<slide_id>.h5`: `features` float32 (N, D), `coords` int64 (N, 2) level-0 (x, y), with attributes
`patch_size`, `patch_size_level0`, `magnification`, `mpp`, `patch_level` (0: coords are level 0), `backbone` on
both the file and the `coords` dataset (where CLAM and TRIDENT readers look). Files are written to a temporary name
and renamed, so an interrupted run never leaves a half-written bag that a later run would skip.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import zoo
from .slide import SLIDE_SUFFIXES, SlideError, open_slide
from .tiling import TilingPlan, plan_tiles

log = logging.getLogger(__name__)


class TileDataset(Dataset):
    """Tiles of one slide as normalised (3, patch_size, patch_size) tensors. Each worker opens its own handle."""

    def __init__(self, path: Path, plan: TilingPlan, mean, std):
        self.path, self.plan = path, plan
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self._slide = None

    def __len__(self) -> int:
        return len(self.plan.coords)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = open_slide(self.path)
        x, y = (int(v) for v in self.plan.coords[index])
        size = self.plan.read_size
        try:
            region = self._slide.read_region((x, y), self.plan.read_level, (size, size))
        except Exception as err:  # OpenSlideError on a damaged tile
            raise SlideError(f"{self.path}: cannot read the tile at level-0 (x, y) = ({x}, {y}): {err}") from err
        # Transparent pixels (outside the scanned area) become white, as on glass.
        rgb = Image.new("RGB", region.size, (255, 255, 255))
        rgb.paste(region, mask=region.getchannel("A"))
        if size != self.plan.patch_size:
            rgb = rgb.resize((self.plan.patch_size, self.plan.patch_size), Image.BILINEAR)
        tensor = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (tensor - self.mean) / self.std


@dataclass
class Embedder:
    model: torch.nn.Module
    name: str
    mean: tuple
    std: tuple
    device: torch.device

    @property
    def dim(self) -> int:
        return self.model.num_features


def load_backbone(name: str, pretrained: bool = False, checkpoint: str | None = None, device: str = "auto",
                  **kwargs) -> Embedder:
    """A patch encoder: `timm.create_model(name)` (zoo entries are timm tags once mamba2d is imported) without its
    classifier, in eval mode, with the input normalisation of its pretrained cfg.

    Args:
        name: A timm model name or `arch.tag`.
        pretrained: Load the tag's weights (timm's route: the zoo's entries are sha256-checked).
        checkpoint: Weights of your own in any layout the zoo reads; loaded strictly (every key must fit, the
            classifier included) before the classifier is removed.
        device: "auto" (CUDA when available), "cpu", "cuda", ...
        **kwargs: More `timm.create_model` arguments.
    """
    if checkpoint:
        weights = zoo.read_model_weights(checkpoint)
        classifier = getattr(timm.models.get_pretrained_cfg(name), "classifier", None)
        head = weights.get(f"{classifier}.weight") if isinstance(classifier, str) else None
        model = timm.create_model(name, pretrained=pretrained, num_classes=0 if head is None else head.shape[0],
                                  **kwargs)
        zoo.load_into(model, weights, checkpoint)
        model.reset_classifier(0)
    else:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    cfg = model.pretrained_cfg or {}
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    model = model.eval().to(resolved)
    return Embedder(model, name, tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                    tuple(cfg.get("std", (0.229, 0.224, 0.225))), resolved)


def write_bag_h5(path: Path, features: np.ndarray, coords: np.ndarray, attrs: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    with h5py.File(tmp, "w") as handle:
        handle.create_dataset("features", data=features.astype(np.float32))
        dataset = handle.create_dataset("coords", data=coords.astype(np.int64))
        for target in (handle, dataset):
            target.attrs.update(attrs)
    tmp.replace(path)


def bag_is_complete(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as handle:
            return "features" in handle and "coords" in handle and len(handle["features"]) == len(handle["coords"])
    except OSError:
        return False


@torch.inference_mode()
def extract_slide(path: str | Path, out_dir: str | Path, embedder: Embedder, patch_size: int = 224,
                  mpp: float | None = None, magnification: float | None = None, tissue_threshold: float = 0.5,
                  batch_size: int = 64, num_workers: int = 0, assume_mpp: float | None = None,
                  overwrite: bool = False, progress: bool = True) -> dict:
    """Embed one slide's tissue tiles; returns a summary (slide, h5, patches, seconds, skipped)."""
    path, out_dir = Path(path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{path.stem}.h5"
    if target.exists() and not overwrite and bag_is_complete(target):
        return {"slide": str(path), "h5": str(target), "skipped": True}
    start = time.perf_counter()
    slide = open_slide(path)
    try:
        plan = plan_tiles(slide, path, patch_size, mpp, magnification, tissue_threshold, assume_mpp=assume_mpp)
    finally:
        slide.close()
    if len(plan.coords) == 0:
        raise SlideError(f"{path}: no tissue tiles found (tissue_threshold={tissue_threshold}); nothing to write")
    loader = DataLoader(TileDataset(path, plan, embedder.mean, embedder.std), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=embedder.device.type == "cuda")
    features = []
    for batch in tqdm(loader, desc=path.name, unit="batch", disable=not progress, leave=False):
        features.append(embedder.model(batch.to(embedder.device, non_blocking=True)).float().cpu())
    feats = torch.cat(features).numpy()
    attrs = {"patch_size": plan.patch_size, "patch_size_level0": plan.patch_size_level0, "patch_level": 0,
             "magnification": plan.magnification, "mpp": plan.mpp, "backbone": embedder.name,
             "slide": path.name}
    write_bag_h5(target, feats, plan.coords, attrs)
    seconds = time.perf_counter() - start
    log.info("%s: %d patches -> %s in %.1fs", path, len(feats), target, seconds)
    return {"slide": str(path), "h5": str(target), "patches": len(feats), "seconds": seconds, "skipped": False,
            "dim": feats.shape[1]}


def find_slides(inputs: list[str | Path]) -> list[Path]:
    """Slide files among `inputs` (files, or folders searched one level deep by slide suffix)."""
    slides = []
    for item in map(Path, inputs):
        if item.is_dir():
            slides += sorted(p for p in item.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
        elif item.is_file():
            slides.append(item)
        else:
            raise SlideError(f"{item}: no such slide file or folder")
    if not slides:
        raise SlideError(f"no slide files ({', '.join(SLIDE_SUFFIXES)}) in {[str(i) for i in inputs]}")
    return slides
