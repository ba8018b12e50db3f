"""Effective receptive fields (ERF) of backbones, plotted side by side with one colour scale.

For each model and image: the gradient of sum(ReLU(final-stage activation at the central location)) with respect to
the input, passed through ReLU and summed over input channels; averaged over images. Each map is then divided by its
total, so a pixel's value is its share of the total contribution, and every panel is drawn on one logarithmic colour
scale. The high-contribution area ratio at threshold t is the fraction of the image covered by the smallest centred
square that holds a share t of the total contribution (on the raw shares; RepLKNet and VMamba compute it on
log-scaled maps, which gives larger ratios). A larger ratio at a given t means a wider ERF.

    mamba2d-erf --models vmamba2d_nano.digits vmamba_nano.digits --random-init --out erf.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
# scikit-image's bundled natural photographs (no download needed).
DEFAULT_IMAGES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def _square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, resize to size x size, as float RGB in [0, 1]."""
    from skimage.color import gray2rgb, rgba2rgb
    from skimage.transform import resize

    image = np.asarray(image)
    if image.ndim == 2:
        image = gray2rgb(image)
    elif image.shape[-1] == 4:
        image = rgba2rgb(image)
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top: top + side, left: left + side]
    return resize(image, (size, size), anti_aliasing=True, preserve_range=False).astype(np.float32)


def load_images(directory: str | Path | None, size: int) -> tuple[np.ndarray, list[str]]:
    """(n, size, size, 3) float images in [0, 1] from `directory`, or scikit-image's bundled photos when None."""
    if directory is None:
        import skimage.data

        return np.stack([_square_resize(getattr(skimage.data, n)(), size) for n in DEFAULT_IMAGES]), [*DEFAULT_IMAGES]
    from skimage.io import imread

    paths = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {directory}")
    return np.stack([_square_resize(imread(p), size) for p in paths]), [p.name for p in paths]


def final_stage_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last stage's feature map (batch, C, h, w): forward_features of a classifier, the last map of a
    features_only model."""
    if hasattr(model, "forward_features"):
        return model.forward_features(x)
    out = model(x)
    if isinstance(out, (list, tuple)):
        return out[-1]
    raise TypeError(f"{type(model).__name__}: cannot find a final-stage feature map (no forward_features, no list)")


def erf_map(model: nn.Module, images: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Mean over images of ReLU(d sum ReLU(center activation) / d input), summed over channels: (H, W).

    Images do not interact in eval mode, so one backward pass over a batch gives every image's gradient.
    """
    model.eval()
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = images[start: start + batch_size].clone().requires_grad_(True)
        feats = final_stage_features(model, x)
        h, w = feats.shape[-2:]
        torch.relu(feats[:, :, h // 2, w // 2]).sum().backward()
        total += torch.relu(x.grad).sum(dim=(0, 1)).double().cpu()
    return (total / len(images)).numpy()


def area_ratios(contribution: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> dict[float, float]:
    """For each t, the area (fraction of the image) of the smallest centred square holding a share t of the map."""
    height, width = contribution.shape
    total = contribution.sum()
    if total <= 0:
        raise ValueError("area_ratios: the contribution map is all zero (no gradient reached the input)")
    cy, cx = height // 2, width // 2
    ratios = {}
    for t in thresholds:
        for radius in range(max(height, width)):
            top, left = max(cy - radius, 0), max(cx - radius, 0)
            window = contribution[top: cy + radius + 1, left: cx + radius + 1]
            if window.sum() >= t * total:
                ratios[t] = window.size / contribution.size
                break
    return ratios


@dataclass
class ErfResult:
    label: str
    init: str  # "trained" or "random"
    ratios: dict[float, float]
    share: np.ndarray  # contribution map normalised to sum 1

    def row(self) -> str:
        return f"{self.label:<28}{self.init:<9}" + "".join(f"{self.ratios[t]:>9.4f}" for t in sorted(self.ratios))


def _infer_num_classes(state_dict: dict[str, torch.Tensor]) -> dict:
    head = state_dict.get("classifier.head.weight")
    return {"num_classes": head.shape[0]} if head is not None else {"num_classes": 0}


def resolve_model(spec: str, random_init: bool = False, seed: int = 0) -> tuple[nn.Module, str]:
    """A model from `spec`: a zoo name, `ARCH=CHECKPOINT` (any layout the zoo reads) or a timm name (random init).

    With `random_init` the same architecture is built with fresh weights (seeded), for the random-vs-trained rows.
    """
    import timm

    from .. import zoo

    torch.manual_seed(seed)
    if zoo.is_entry(spec):
        entry = zoo.get(spec)
        if random_init:
            return timm.create_model(entry.arch, **entry.kwargs), spec
        return zoo.load(spec), spec
    if "=" in spec:
        arch, path = spec.split("=", 1)
        state_dict = zoo.read_model_weights(path)
        model = timm.create_model(arch, **_infer_num_classes(state_dict))
        if not random_init:
            zoo.load_into(model, state_dict, path)
        return model, f"{arch} ({Path(path).name})"
    return timm.create_model(spec), spec


def normalisation(spec: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std for `spec`: the zoo entry's, else the architecture's pretrained cfg (ImageNet's by default).

    The random-init twin of a model uses the same normalisation, so both rows see identical inputs.
    """
    import timm

    from .. import zoo

    if zoo.is_entry(spec) and "mean" in zoo.get(spec).input:
        entry = zoo.get(spec)
        return tuple(entry.input["mean"]), tuple(entry.input["std"])
    arch = zoo.get(spec).arch if zoo.is_entry(spec) else spec.split("=", 1)[0]
    cfg = timm.models.get_pretrained_cfg(arch)
    return tuple(cfg.mean), tuple(cfg.std)


def compute(specs: Sequence[str], images: np.ndarray, random_init: bool = False, device: str = "cpu",
            thresholds: Sequence[float] = THRESHOLDS, mean_std: tuple | None = None) -> list[ErfResult]:
    """ERF of every model in `specs` (and of its random-init twin when `random_init`) on `images` (n, H, W, 3)."""
    results = []
    for init in (("random", "trained") if random_init else ("trained",)):
        for spec in specs:
            model, label = resolve_model(spec, random_init=init == "random")
            mean, std = mean_std or normalisation(spec)
            x = (torch.from_numpy(images).permute(0, 3, 1, 2) - torch.tensor(mean)[:, None, None]) / torch.tensor(
                std)[:, None, None]
            contribution = erf_map(model.to(device), x.float().to(device))
            results.append(ErfResult(label, init, area_ratios(contribution, thresholds),
                                     contribution / contribution.sum()))
    return results


def plot(results: Sequence[ErfResult], out: Path, title: str = "") -> None:
    """Grid of ERF maps (rows: random init / trained; columns: models) on one shared log colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    inits = [*dict.fromkeys(r.init for r in results)]
    labels = [*dict.fromkeys(r.label for r in results)]
    vmax = max(float(r.share.max()) for r in results)
    norm = LogNorm(vmin=vmax * 1e-4, vmax=vmax)
    fig, axes = plt.subplots(len(inits), len(labels), figsize=(3.2 * len(labels) + 0.8, 3.3 * len(inits)),
                             squeeze=False, constrained_layout=True)
    image = None
    for r in results:
        ax = axes[inits.index(r.init)][labels.index(r.label)]
        image = ax.imshow(np.clip(r.share, vmax * 1e-4, None), cmap="RdYlGn", norm=norm)
        ratios = "  ".join(f"{t:g}:{v:.3f}" for t, v in sorted(r.ratios.items()))
        ax.set_title(f"{r.label} ({r.init})\narea ratio {ratios}", fontsize=7.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.85, label="share of total input contribution per pixel (log)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(out, dpi=130)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mamba2d-erf",
        description="Effective receptive fields of backbones: heatmaps on one colour scale and high-contribution "
        "area ratios at 0.2/0.3/0.5/0.99 (printed, and saved as JSON next to the figure).",
    )
    parser.add_argument("--models", nargs="+", required=True,
                        help="zoo names (e.g. vmamba2d_nano.digits), ARCH=CHECKPOINT, or timm names (random init)")
    parser.add_argument("--images", default=None,
                        help="directory of images (default: scikit-image's bundled natural photos)")
    parser.add_argument("--size", type=int, default=224, help="input size the images are resized to (default 224)")
    parser.add_argument("--out", type=Path, default=Path("erf.png"), help="figure path (numbers: same name .json)")
    parser.add_argument("--random-init", action="store_true", help="add a row of the same models at random init")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mean-std", type=float, nargs=6, default=None, metavar="V",
                        help="input normalisation (3 means, 3 stds); default: the zoo entry's, else the timm cfg's")
    parser.add_argument("--title", default="")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    images, names = load_images(args.images, args.size)
    mean_std = (tuple(args.mean_std[:3]), tuple(args.mean_std[3:])) if args.mean_std else None
    results = compute(args.models, images, random_init=args.random_init, device=args.device, mean_std=mean_std)
    header = f"{'model':<28}{'init':<9}" + "".join(f"{f'r@{t:g}':>9}" for t in THRESHOLDS)
    print(f"ERF area ratios on {len(names)} images at {args.size}x{args.size} ({', '.join(names)})")
    print(header)
    for r in results:
        print(r.row())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.out, args.title)
    numbers = {
        "images": names, "size": args.size, "thresholds": [*THRESHOLDS],
        "results": [{k: v for k, v in asdict(r).items() if k != "share"} for r in results],
    }
    args.out.with_suffix(".json").write_text(json.dumps(numbers, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
