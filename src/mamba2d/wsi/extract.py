"""Slide -> CLAM-format feature bag: tissue tiles read with OpenSlide, embedded in batches by a timm / zoo backbone.

Output `<out_dir>/<slide_id>.h5`: `features` float32 (N, D) and `coords` int64 (N, 2) level-0 (x, y) of each
patch's top-left corner. The `coords` dataset (and the file) carry the attributes CLAM and TRIDENT write
(`bag_attributes`), so both tools' readers find the patch geometry. Files are written under a temporary name and
renamed, so an interrupted run never leaves a half-written bag that a later run would take for a finished one.

`extract_features` spreads the slides over devices and nodes with Lightning Fabric (one slide at a time per
process, each process its own share of the slides), skips slides whose bag is complete, redoes damaged ones and
writes a preview PNG per slide (`previews/<slide_id>.png`: thumbnail, tissue contour, kept tiles).
"""

from __future__ import annotations

import atexit
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
from ..models import input_normalization
from .heatmap import render_tiling_preview
from .slide import SLIDE_SUFFIXES, SlideError, open_slide
from .tiling import TilingPlan, plan_tiles

log = logging.getLogger(__name__)


class TileDataset(Dataset):
    """Tiles of one slide as normalised (3, patch_size, patch_size) tensors. Each worker opens its own handle.

    Args:
        path: The slide file.
        plan: Its tiling plan.
        mean: Per-channel input mean of the backbone.
        std: Per-channel input standard deviation of the backbone.
    """

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
    """A patch encoder ready for inference.

    Args:
        model: The timm model without classifier, in eval mode, on `device`.
        name: Its timm name or `arch.tag`.
        mean: Input normalisation mean of its pretrained cfg.
        std: Input normalisation standard deviation.
        device: Where it runs.
    """

    model: torch.nn.Module
    name: str
    mean: tuple
    std: tuple
    device: torch.device

    @property
    def dim(self) -> int:
        """Feature size D of one patch."""
        return self.model.num_features


def load_backbone(name: str, pretrained: bool = False, checkpoint: str | None = None,
                  device: str | torch.device = "auto", **kwargs) -> Embedder:
    """A patch encoder: `timm.create_model(name)` (zoo entries are timm tags once mamba2d is imported) without its
    classifier, in eval mode, with the input normalisation of its pretrained cfg.

    Args:
        name: A timm model name or `arch.tag`.
        pretrained: Load the tag's weights (timm's route: the zoo's entries are sha256-checked).
        checkpoint: Weights of your own in any layout the zoo reads; loaded strictly (every key must fit, the
            classifier included) before the classifier is removed.
        device: "auto" (CUDA when available), "cpu", "cuda:1", or a `torch.device`.
        **kwargs: More `timm.create_model` arguments.

    Returns:
        An `Embedder`.
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
    mean, std = input_normalization(model)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    model = model.eval().to(resolved)
    return Embedder(model, name, mean, std, resolved)


def bag_attributes(plan: TilingPlan, slide_path: Path, out_dir: Path, backbone: str) -> dict:
    """The attributes written on a bag's `coords` dataset (and on the file).

    CLAM's (`create_patches_fp.py`): `patch_size` and `patch_level` (the pixels read, at that pyramid level:
    level-0 footprint = `patch_size` x `downsample`), `downsample` (x, y) of that level, `level_dim` and
    `downsampled_level_dim` (its width, height), `name`, `save_path`. TRIDENT's: `patch_size_level0`,
    `level0_magnification`, `target_magnification`, `overlap` (0), `savetodir`. Ours: `target_patch_size` (pixels
    given to the backbone), `mpp` (of the patches), `level0_mpp` and `mpp_source`, `bounds` (scanned region x, y,
    width, height), `backbone`, `slide`. Coordinates are level 0 in every convention.

    Args:
        plan: The slide's tiling plan.
        slide_path: The slide file.
        out_dir: Where the bag is written.
        backbone: The patch encoder's name.

    Returns:
        A dict of h5-storable values.
    """
    return {
        "patch_size": plan.read_size, "patch_level": plan.read_level,
        "downsample": np.array([plan.read_downsample, plan.read_downsample]),
        "level_dim": np.array(plan.read_level_dims), "downsampled_level_dim": np.array(plan.read_level_dims),
        "name": slide_path.stem, "save_path": str(out_dir),
        "patch_size_level0": plan.patch_size_level0, "level0_magnification": float(plan.level0_magnification),
        "target_magnification": float(plan.magnification), "overlap": 0, "savetodir": str(out_dir),
        "target_patch_size": plan.patch_size, "mpp": plan.mpp, "level0_mpp": plan.level0_mpp,
        "mpp_source": plan.mpp_source, "bounds": np.array(plan.bounds), "backbone": backbone,
        "slide": slide_path.name,
    }


def write_bag_h5(path: Path, features: np.ndarray, coords: np.ndarray, attrs: dict) -> None:
    """Write a bag under `<path>.part`, then rename it to `path` (a crash never leaves a bag that looks finished).

    Args:
        path: The `.h5` to write.
        features: (N, D) features, stored as float32.
        coords: (N, 2) level-0 (x, y), stored as int64.
        attrs: Attributes for the `coords` dataset and the file.
    """
    tmp = path.with_name(path.name + ".part")
    with h5py.File(tmp, "w") as handle:
        handle.create_dataset("features", data=features.astype(np.float32))
        dataset = handle.create_dataset("coords", data=coords.astype(np.int64))
        for target in (handle, dataset):
            target.attrs.update(attrs)
    tmp.replace(path)


def bag_is_complete(path: Path) -> bool:
    """Whether `path` is a readable bag with `features` and `coords` of one non-zero length (truncated, empty or
    foreign files are not).

    Args:
        path: The `.h5` file.

    Returns:
        True for a finished bag.
    """
    try:
        with h5py.File(path, "r") as handle:
            if "features" not in handle or "coords" not in handle:
                return False
            features, coords = handle["features"], handle["coords"]
            if features.ndim != 2 or len(features) == 0 or len(features) != len(coords):
                return False
            features[-1]  # the last row is readable: the data were written to the end
            coords[-1]
            return True
    except (OSError, KeyError, ValueError):
        return False


def _check_same_settings(path: Path, backbone: str, patch_size: int) -> None:
    with h5py.File(path, "r") as handle:
        attrs = dict(handle["coords"].attrs)
    found = {"backbone": attrs.get("backbone"), "target_patch_size": attrs.get("target_patch_size")}
    asked = {"backbone": backbone, "target_patch_size": patch_size}
    differ = {k: (found[k], asked[k]) for k in asked if found[k] is not None and found[k] != asked[k]}
    if differ:
        detail = ", ".join(f"{k} {old!r} in the file, {new!r} asked" for k, (old, new) in differ.items())
        raise SlideError(f"{path}: an existing bag was made with other settings ({detail}); pass overwrite=True "
                         "(--overwrite) or another out_dir")


@torch.inference_mode()
def extract_slide(path: str | Path, out_dir: str | Path, embedder: Embedder, patch_size: int = 224,
                  mpp: float | None = None, magnification: float | None = None, tissue_threshold: float = 0.5,
                  batch_size: int = 64, num_workers: int = 0, assume_mpp: float | None = None,
                  overwrite: bool = False, progress: bool = True, override_mpp: bool = False,
                  preview: bool = True) -> dict:
    """Embed one slide's tissue tiles into `<out_dir>/<slide_id>.h5`.

    Args:
        path: The slide file.
        out_dir: Output folder.
        embedder: The patch encoder (`load_backbone`).
        patch_size: Patch side in pixels at the target resolution.
        mpp: Target µm/px (default 0.5).
        magnification: Target objective power instead of `mpp`.
        tissue_threshold: Smallest tissue fraction of a kept tile.
        batch_size: Tiles per forward pass.
        num_workers: DataLoader worker processes reading tiles.
        assume_mpp: Level-0 µm/px for slides without `openslide.mpp-x` (see `mamba2d.wsi.slide`).
        overwrite: Redo a slide whose bag is complete.
        progress: Show a progress bar over batches.
        override_mpp: Use `assume_mpp` even when the slide records its own µm/px.
        preview: Write `<out_dir>/previews/<slide_id>.png` (thumbnail, tissue contour, kept tiles).

    Returns:
        Summary dict: slide, h5, skipped, and for extracted slides patches, dim, seconds (whole slide),
        embed_seconds (tile reading and embedding), preview (PNG path or None).

    Raises:
        SlideError: The slide cannot be read, has no tissue tiles, or its existing bag was made with other
            settings (names the file).
    """
    path, out_dir = Path(path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{path.stem}.h5"
    if target.exists() and not overwrite:
        if bag_is_complete(target):
            _check_same_settings(target, embedder.name, patch_size)
            return {"slide": str(path), "h5": str(target), "skipped": True}
        log.warning("%s: incomplete or unreadable bag, extracting %s again", target, path)
    start = time.perf_counter()
    slide = open_slide(path)
    try:
        plan = plan_tiles(slide, path, patch_size, mpp, magnification, tissue_threshold, assume_mpp=assume_mpp,
                          override_mpp=override_mpp)
    finally:
        slide.close()
    png = render_tiling_preview(plan, out_dir / "previews" / f"{path.stem}.png", title=path.name) if preview \
        else None
    if len(plan.coords) == 0:
        raise SlideError(f"{path}: no tissue tiles found (tissue_threshold={tissue_threshold}); nothing to write")
    loader = DataLoader(TileDataset(path, plan, embedder.mean, embedder.std), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=embedder.device.type == "cuda")
    embed_start = time.perf_counter()
    features = []
    for batch in tqdm(loader, desc=path.name, unit="batch", disable=not progress, leave=False):
        features.append(embedder.model(batch.to(embedder.device, non_blocking=True)).float().cpu())
    feats = torch.cat(features).numpy()
    embed_seconds = time.perf_counter() - embed_start
    write_bag_h5(target, feats, plan.coords, bag_attributes(plan, path, out_dir, embedder.name))
    seconds = time.perf_counter() - start
    log.info("%s: %d patches -> %s in %.1f s (%.1f patches/s embedding on %s)", path, len(feats), target, seconds,
             len(feats) / max(embed_seconds, 1e-9), embedder.device)
    return {"slide": str(path), "h5": str(target), "patches": len(feats), "seconds": seconds,
            "embed_seconds": embed_seconds, "skipped": False, "dim": feats.shape[1],
            "preview": str(png) if png else None}


def find_slides(inputs: list[str | Path]) -> list[Path]:
    """Slide files among `inputs`.

    Args:
        inputs: Files, or folders searched one level deep by slide suffix.

    Returns:
        The slide paths, folders' contents sorted by name.

    Raises:
        SlideError: An input does not exist, or no slide file was found.
    """
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


def throughput_per_device(summaries: list[dict]) -> dict[int, dict]:
    """Patches per second of each process over the slides it extracted.

    Args:
        summaries: What `extract_features` returns (skipped and failed slides are ignored).

    Returns:
        {rank: {"device", "slides", "patches", "seconds", "patches_per_s", "embed_patches_per_s"}}, `seconds`
        being the wall time of its slides (tissue detection, reading, embedding, writing) and
        `embed_patches_per_s` counting tile reading and embedding only.
    """
    table: dict[int, dict] = {}
    for summary in summaries:
        if summary.get("skipped") or "patches" not in summary:
            continue
        row = table.setdefault(summary.get("rank", 0), {"device": summary.get("device", "?"), "slides": 0,
                                                         "patches": 0, "seconds": 0.0, "embed_seconds": 0.0})
        row["slides"] += 1
        row["patches"] += summary["patches"]
        row["seconds"] += summary["seconds"]
        row["embed_seconds"] += summary["embed_seconds"]
    for row in table.values():
        row["patches_per_s"] = row["patches"] / max(row["seconds"], 1e-9)
        row["embed_patches_per_s"] = row["patches"] / max(row.pop("embed_seconds"), 1e-9)
    return table


@dataclass
class _Job:
    """Everything a process needs to extract its share (picklable, for spawned processes; not frozen, as Fabric's
    launcher walks its arguments)."""

    slides: tuple[str, ...]
    out_dir: str
    backbone: str
    pretrained: bool
    checkpoint: str | None
    patch_size: int
    mpp: float | None
    magnification: float | None
    assume_mpp: float | None
    override_mpp: bool
    tissue_threshold: float
    batch_size: int
    num_workers: int
    overwrite: bool
    preview: bool
    progress: bool
    own_group: bool  # no process group existed before the call: the launch makes one, destroyed at exit


def _pending(job: _Job) -> list[str]:
    """The slides still to do, largest file first (so the shares of the processes end at about the same time)."""
    out_dir = Path(job.out_dir)
    todo = []
    for slide in job.slides:
        target = out_dir / f"{Path(slide).stem}.h5"
        if job.overwrite or not target.exists() or not bag_is_complete(target):
            todo.append(slide)
        else:
            _check_same_settings(target, job.backbone, job.patch_size)
    return sorted(todo, key=lambda s: -Path(s).stat().st_size)


def _end_process_group() -> None:
    """Destroy the default process group, if any, while the interpreter is whole. A process that exits with a gloo
    group alive can abort as it shuts down ("terminate called without an active exception", SIGABRT: the group's
    worker threads outlive it), which fails a spawned extraction whose work is done. Lightning registers the same
    for NCCL groups only. At exit, not at the end of the run: a caller may go on to use distributed PyTorch, and a
    group made again under torchrun after a destroy failed or hung when tried."""
    if _has_process_group():
        torch.distributed.destroy_process_group()


def _has_process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _run_share(fabric, job: _Job) -> list[dict]:
    # Every process reads the same files before any writes (the barrier), so all agree on what is left to do.
    todo = _pending(job)
    fabric.barrier()
    share = todo[fabric.global_rank::fabric.world_size]
    with fabric.rank_zero_first():  # one process downloads pretrained weights, the others read the cache
        embedder = load_backbone(job.backbone, job.pretrained, job.checkpoint, device=fabric.device)
    summaries: list[dict] = []
    progress = job.progress and fabric.global_rank == 0
    for slide in tqdm(share, desc=f"slides (rank {fabric.global_rank})", unit="slide", disable=not progress):
        try:
            summary = extract_slide(slide, job.out_dir, embedder, job.patch_size, job.mpp, job.magnification,
                                    job.tissue_threshold, job.batch_size, job.num_workers, job.assume_mpp,
                                    job.overwrite, progress=progress and len(share) == 1,
                                    override_mpp=job.override_mpp,
                                    preview=job.preview)
        except SlideError as err:  # one bad slide must not stop the others (nor leave the other ranks waiting)
            summary = {"slide": slide, "error": str(err), "skipped": False}
        summaries.append({**summary, "rank": fabric.global_rank, "device": str(fabric.device)})
    if fabric.world_size > 1:
        gathered: list[list[dict]] = [[] for _ in range(fabric.world_size)]
        torch.distributed.all_gather_object(gathered, summaries)
        summaries = [s for part in gathered for s in part]
        if job.own_group:
            atexit.unregister(_end_process_group)  # once per process, however many runs
            atexit.register(_end_process_group)
    done = {s["slide"] for s in summaries}
    summaries += [{"slide": s, "h5": str(Path(job.out_dir) / f"{Path(s).stem}.h5"), "skipped": True}
                  for s in job.slides if s not in done]
    order = {s: i for i, s in enumerate(job.slides)}
    summaries.sort(key=lambda s: order[s["slide"]])
    if fabric.global_rank == 0:
        for rank, row in sorted(throughput_per_device(summaries).items()):
            log.info("rank %d (%s): %d slides, %d patches in %.1f s: %.1f patches/s (%.1f reading and embedding)",
                     rank, row["device"], row["slides"], row["patches"], row["seconds"], row["patches_per_s"],
                     row["embed_patches_per_s"])
    failed = [s for s in summaries if "error" in s]
    if failed:
        raise SlideError(f"{len(failed)} slide(s) failed (the others are done): " +
                         "; ".join(s["error"] for s in failed))
    return summaries


def extract_features(slides: list[str | Path], out_dir: str | Path, backbone: str = "resnet50",
                     pretrained: bool = False, checkpoint: str | None = None, patch_size: int = 224,
                     mpp: float | None = None, magnification: float | None = None, assume_mpp: float | None = None,
                     override_mpp: bool = False, tissue_threshold: float = 0.5, batch_size: int = 64,
                     num_workers: int = 0, accelerator: str = "auto", devices: int | str | list[int] = 1,
                     num_nodes: int = 1,
                     strategy: str = "auto", overwrite: bool = False, preview: bool = True,
                     progress: bool = True) -> list[dict]:
    """Extract feature bags for many slides, spread over devices and nodes, resuming where a previous run stopped.

    Each process (one per device and node, launched by Lightning Fabric; under `torchrun` or SLURM the launcher's
    processes are used) takes its own share of the slides still to do and writes one bag per slide. A slide whose
    bag is complete is skipped (`overwrite` to redo it); a damaged or truncated bag is extracted again. A slide that
    fails (unreadable, no tissue) does not stop the others: all failures are raised together at the end. A process
    group the launch creates is destroyed when its process exits (one that existed before the call is left as it
    was).

    Args:
        slides: Slide files, or folders searched one level deep by slide suffix.
        out_dir: Folder of the bags (`<slide_id>.h5`) and previews (`previews/<slide_id>.png`).
        backbone: timm model name or zoo `arch.tag`.
        pretrained: Load the backbone's pretrained weights.
        checkpoint: Weights of your own for the backbone (any layout the zoo reads), loaded strictly.
        patch_size: Patch side in pixels at the target resolution.
        mpp: Target µm/px (default 0.5).
        magnification: Target objective power instead of `mpp`.
        assume_mpp: Level-0 µm/px for slides without `openslide.mpp-x`. The slide's metadata wins unless
            `override_mpp` is set; see `mamba2d.wsi.slide` for the whole order.
        override_mpp: Use `assume_mpp` even for slides that record their own µm/px.
        tissue_threshold: Smallest tissue fraction (0-1) of a kept tile.
        batch_size: Tiles per forward pass.
        num_workers: DataLoader worker processes reading tiles, per device.
        accelerator: "auto", "cpu", "gpu", ... (Lightning's names).
        devices: Devices per node (an int, a list of ids, or "auto").
        num_nodes: Number of machines.
        strategy: Lightning strategy; "auto" is one process per device ("ddp"), "ddp_spawn" spawns them from
            this process instead of re-running the command.
        overwrite: Redo slides whose bag is complete.
        preview: Write a preview PNG per slide.
        progress: Show progress bars (on the first process).

    Returns:
        One summary per slide, in input order (see `extract_slide`), with `rank` and `device` for extracted
        slides; `throughput_per_device` turns them into patches/s per device.

    Raises:
        SlideError: Listing every slide that failed, each with its file and cause.
    """
    from lightning.fabric import Fabric

    paths = find_slides(slides)
    job = _Job(tuple(str(p) for p in paths), str(out_dir), backbone, pretrained, checkpoint, patch_size, mpp,
               magnification, assume_mpp, override_mpp, tissue_threshold, batch_size, num_workers, overwrite, preview,
               progress, own_group=not _has_process_group())
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    return fabric.launch(_run_share, job)
