"""Effective receptive fields (ERF) of backbones, plotted side by side with one colour scale.

For each model and image: the gradient of sum(ReLU(final-stage activation of one unit)) with respect to the input,
passed through ReLU and summed over input channels; averaged over images. The probed unit is the one whose
receptive field is centred nearest the image centre, and the area ratios are measured around that field's true
centre (`locate_probe`, traced from the kernel, stride and padding of the layers that change resolution). Unit j of
a stride-32 backbone whose layers pad (k - 1) / 2 is centred on pixel 32j: at 64 pixels (a 2 x 2 map) unit 1 is
centred on pixel 32, half a pixel from the image centre 31.5; at 160 pixels (5 x 5) the middle unit 2 is centred on
pixel 64, not on the image centre 79.5. The figure names the unit and marks the centre it is measured around.

Each map is divided by its total, so a pixel's value is its share of the total contribution, and every panel is
drawn on one logarithmic colour scale. The high-contribution area ratio at threshold t is the fraction of the image
covered by the smallest square around that centre (clipped to the image) that holds a share t of the total
contribution (on the raw shares; RepLKNet and VMamba compute it on log-scaled maps, which gives larger ratios). A
larger ratio at a given t means a wider ERF.

    mamba2d erf --models '[vmamba2d_nano.digits, vmamba_nano.digits]' --random_init true --out erf.png
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from tqdm.auto import tqdm

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
    """(n, size, size, 3) float images in [0, 1] from `directory`, or scikit-image's bundled photos when None.

    Args:
        directory: Folder of images (png, jpg, tif, bmp), or None for the bundled photos.
        size: Side every image is centre-cropped and resized to.

    Returns:
        The images and their names.
    """
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
    features_only model.

    Args:
        model: A classifier or a features_only backbone.
        x: (batch, 3, H, W) input.
    """
    if hasattr(model, "forward_features"):
        return model.forward_features(x)
    out = model(x)
    if isinstance(out, (list, tuple)):
        return out[-1]
    raise TypeError(f"{type(model).__name__}: cannot find a final-stage feature map (no forward_features, no list)")


@dataclass(frozen=True)
class Probe:
    """The final-map unit whose receptive field is centred nearest the image centre, and where that field is centred.

    Unit j of the final map has its receptive field centred on input pixel `stride * j + offset` (per axis), from the
    kernel, stride and padding of the layers that change resolution (`locate_probe`). The ERF is the gradient of
    that one unit, and its area ratios are measured around `centre`, the field's true centre.

    Args:
        unit: (row, column) of the probed unit on the final map.
        centre: (row, column) input pixel on which its receptive field is centred.
        stride: Input pixels per final unit (rows, columns).
        offset: Input pixel on which unit 0's receptive field is centred (rows, columns).
        traced: Whether stride and offset were traced from the layers (else assumed: the middle of each unit).
        final: The final map's (height, width).
    """

    unit: tuple[int, int]
    centre: tuple[float, float]
    stride: tuple[float, float]
    offset: tuple[float, float]
    traced: bool
    final: tuple[int, int]

    def describe(self, image_shape: tuple[int, int]) -> str:
        """One line for the figure and the JSON.

        Args:
            image_shape: (H, W) of the input.
        """
        image_centre = ((image_shape[0] - 1) / 2, (image_shape[1] - 1) / 2)
        how = "traced from the layers" if self.traced else "assumed: the layers' geometry could not be traced"
        return (f"probe: unit ({self.unit[0]}, {self.unit[1]}) of the {self.final[0]}x{self.final[1]} final map, "
                f"receptive field centred on pixel ({self.centre[0]:g}, {self.centre[1]:g}) ({how}); image centre "
                f"({image_centre[0]:g}, {image_centre[1]:g})")


def _conv_geometry(module: nn.Module, axis: int) -> tuple[float, float]:
    """(stride, centre offset) of one convolution or pooling layer along `axis`: output i is centred on input
    `stride * i + offset`."""

    def pick(value):
        return value[axis] if isinstance(value, (tuple, list)) else value

    kernel, stride, padding = pick(module.kernel_size), pick(module.stride), pick(module.padding)
    dilation = pick(getattr(module, "dilation", 1))
    if isinstance(padding, str):  # "same" / "valid": centred by construction or unpadded
        padding = dilation * (kernel - 1) / 2 if padding == "same" else 0
    return float(stride), dilation * (kernel - 1) / 2 - padding


def locate_probe(model: nn.Module, image_shape: tuple[int, int], device: str | torch.device = "cpu") -> Probe:
    """The final-map unit whose receptive field is centred nearest the centre of an image of `image_shape` (H, W).

    One forward pass records, in execution order, the convolutions and poolings applied at the current resolution
    (a branch that reads a resolution already left, such as a ResNet shortcut, is skipped). When their strides do
    not explain the final map's size (resolution changed by other layers), each unit is assumed centred on the
    middle of its cell and `traced` is False.

    Args:
        model: A backbone (`final_stage_features` finds its last map).
        image_shape: (H, W) of the input.
        device: Where the forward pass runs.
    """
    layers: list[tuple[nn.Module, tuple[int, ...], tuple[int, ...]]] = []
    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    hooks = [m.register_forward_hook(lambda m, i, o: layers.append((m, tuple(i[0].shape[-2:]), tuple(o.shape[-2:]))))
             for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            final = tuple(final_stage_features(model.eval(), torch.zeros(1, 3, *image_shape, device=device)).shape[-2:])
    finally:
        for hook in hooks:
            hook.remove()
    strides, offsets = [1.0, 1.0], [0.0, 0.0]
    current = tuple(image_shape)
    for module, shape_in, shape_out in layers:
        if shape_in != current:
            continue
        for axis in (0, 1):
            stride, offset = _conv_geometry(module, axis)
            offsets[axis] += strides[axis] * offset
            strides[axis] *= stride
        current = shape_out
    traced = current == final
    if not traced:
        strides = [image_shape[a] / final[a] for a in (0, 1)]
        offsets = [(strides[a] - 1) / 2 for a in (0, 1)]
    unit = tuple(min(max(round(((image_shape[a] - 1) / 2 - offsets[a]) / strides[a]), 0), final[a] - 1)
                 for a in (0, 1))
    centre = tuple(strides[a] * unit[a] + offsets[a] for a in (0, 1))
    return Probe(unit, centre, (strides[0], strides[1]), (offsets[0], offsets[1]), traced, final)


def erf_map(model: nn.Module, images: torch.Tensor, batch_size: int = 8, probe: Probe | None = None) -> np.ndarray:
    """Mean over images of ReLU(d sum ReLU(activation of the probed unit) / d input), summed over channels: (H, W).

    Images do not interact in eval mode, so one backward pass over a batch gives every image's gradient.

    Args:
        model: A backbone (`final_stage_features` finds its last map).
        images: (n, 3, H, W) normalised images.
        batch_size: Images per backward pass.
        probe: The unit to probe (default: `locate_probe`'s).
    """
    model.eval()
    probe = probe or locate_probe(model, tuple(images.shape[-2:]), images.device)
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = images[start: start + batch_size].clone().requires_grad_(True)
        feats = final_stage_features(model, x)
        torch.relu(feats[:, :, probe.unit[0], probe.unit[1]]).sum().backward()
        total += torch.relu(x.grad).sum(dim=(0, 1)).double().cpu()
    return (total / len(images)).numpy()


def _span(centre: float, half: float, size: int) -> tuple[int, int]:
    """Pixel rows [start, stop) within [0, size) of a span of half-width `half` around `centre`."""
    return max(int(np.ceil(centre - half - 1e-9)), 0), min(int(np.floor(centre + half + 1e-9)) + 1, size)


def area_ratios(contribution: np.ndarray, thresholds: Sequence[float] = THRESHOLDS,
                centre: tuple[float, float] | None = None) -> dict[float, float]:
    """For each t, the area (fraction of the image) of the smallest square centred on `centre` that holds a share t
    of the map, clipped to the image. A side grows by two pixels at a time, one on each side, so the square stays
    centred (on a half-pixel centre, such as the middle of an even side, its sides are even).

    Args:
        contribution: (H, W) non-negative contribution map.
        thresholds: Shares of the total to enclose.
        centre: (row, column) in pixels, whole or half (default: the image centre ((H-1)/2, (W-1)/2)).
    """
    height, width = contribution.shape
    total = contribution.sum()
    if total <= 0:
        raise ValueError("area_ratios: the contribution map is all zero (no gradient reached the input)")
    cy, cx = centre if centre is not None else ((height - 1) / 2, (width - 1) / 2)
    ratios = {}
    for t in thresholds:
        for step in range(max(height, width) + 1):
            (top, bottom), (left, right) = (_span(c, step + (c % 1), n) for c, n in ((cy, height), (cx, width)))
            window = contribution[top:bottom, left:right]
            if window.size and window.sum() >= t * total * (1 - 1e-12):
                ratios[t] = window.size / contribution.size
                break
    return ratios


def centroid(contribution: np.ndarray) -> tuple[float, float]:
    """(row, column) of the contribution's centre of mass, in pixels (the image centre is ((H-1)/2, (W-1)/2)).

    Args:
        contribution: (H, W) non-negative contribution map.
    """
    rows, cols = np.indices(contribution.shape)
    total = contribution.sum()
    return float((rows * contribution).sum() / total), float((cols * contribution).sum() / total)


@dataclass
class ErfResult:
    """The ERF of one model.

    Args:
        label: Model name shown.
        init: "trained" or "random".
        ratios: Threshold -> area ratio.
        share: Contribution map normalised to sum 1.
        probe: Where the final map was probed (`Probe.describe`).
        centre: (row, column) pixel on which the probed unit's receptive field is centred.
    """

    label: str
    init: str  # "trained" or "random"
    ratios: dict[float, float]
    share: np.ndarray  # contribution map normalised to sum 1
    probe: str = ""
    centre: tuple[float, float] | None = None

    def row(self) -> str:
        """One table row: label, init and the area ratio at each threshold."""
        return f"{self.label:<28}{self.init:<9}" + "".join(f"{self.ratios[t]:>9.4f}" for t in sorted(self.ratios))


def _infer_num_classes(state_dict: dict[str, torch.Tensor]) -> dict:
    head = state_dict.get("classifier.head.weight")
    return {"num_classes": head.shape[0]} if head is not None else {"num_classes": 0}


def resolve_model(spec: str, random_init: bool = False, seed: int = 0) -> tuple[nn.Module, str]:
    """A model from `spec`: a zoo name, `ARCH=CHECKPOINT` (any layout the zoo reads) or a timm name (random init).

    With `random_init` the same architecture is built with fresh weights (seeded), for the random-vs-trained rows.

    Args:
        spec: Zoo name, ARCH=CHECKPOINT or timm name.
        random_init: Build the architecture with fresh weights instead.
        seed: Seed of the fresh weights.

    Returns:
        The model and its label.
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
    """Input mean/std for `spec`: its pretrained cfg (`mamba2d.models.input_normalization`; a zoo backbone's name is
    its timm tag, whose cfg carries the entry's input statistics), the architecture's for ARCH=CHECKPOINT.

    The random-init twin of a model uses the same normalisation, so both rows see identical inputs.

    Args:
        spec: Zoo name, ARCH=CHECKPOINT or timm name.
    """
    from ..models import input_normalization

    return input_normalization(spec.split("=", 1)[0])


def compute(specs: Sequence[str], images: np.ndarray, random_init: bool = False, device: str = "cpu",
            thresholds: Sequence[float] = THRESHOLDS, mean_std: tuple | None = None,
            progress: bool | None = None) -> list[ErfResult]:
    """ERF of every model in `specs` (and of its random-init twin when `random_init`) on `images` (n, H, W, 3).

    Args:
        specs: Models (see `resolve_model`).
        images: (n, H, W, 3) float images in [0, 1].
        random_init: Add each model at random initialisation.
        device: Where the models run.
        thresholds: Shares for the area ratios.
        mean_std: Input normalisation ((3 means), (3 stds)); default per model (`normalisation`).
        progress: Bar over models (None: only on a terminal).
    """
    results = []
    runs = [(init, spec) for init in (("random", "trained") if random_init else ("trained",)) for spec in specs]
    bar = tqdm(total=len(runs) * len(images), desc="ERF (models x images)", unit="image",
               disable=None if progress is None else not progress)
    for init, spec in runs:
        model, label = resolve_model(spec, random_init=init == "random")
        mean, std = mean_std or normalisation(spec)
        x = (torch.from_numpy(images).permute(0, 3, 1, 2) - torch.tensor(mean)[:, None, None]) / torch.tensor(
            std)[:, None, None]
        model = model.to(device)
        probe = locate_probe(model, tuple(images.shape[1:3]), device)
        contribution = erf_map(model, x.float().to(device), probe=probe)
        results.append(ErfResult(label, init, area_ratios(contribution, thresholds, probe.centre),
                                 contribution / contribution.sum(), probe.describe(tuple(images.shape[1:3])),
                                 probe.centre))
        bar.update(len(images))
    bar.close()
    return results


def plot(results: Sequence[ErfResult], title: str = "") -> Figure:
    """Grid of ERF maps (rows: random init / trained; columns: models) on one shared log colour scale; a cross marks
    the centre of the probed unit's receptive field, around which the area ratios are measured, and the title says
    which unit was probed.

    Args:
        results: `compute`'s results.
        title: Figure title.
    """
    inits = [*dict.fromkeys(r.init for r in results)]
    labels = [*dict.fromkeys(r.label for r in results)]
    vmax = max(float(r.share.max()) for r in results)
    norm = LogNorm(vmin=vmax * 1e-4, vmax=vmax)
    fig = Figure(figsize=(3.2 * len(labels) + 0.8, 3.3 * len(inits) + 0.4), layout="constrained")
    axes = fig.subplots(len(inits), len(labels), squeeze=False)
    image = None
    for r in results:
        ax = axes[inits.index(r.init)][labels.index(r.label)]
        image = ax.imshow(np.clip(r.share, vmax * 1e-4, None), cmap="RdYlGn", norm=norm)
        height, width = r.share.shape
        cy, cx = r.centre if r.centre is not None else ((height - 1) / 2, (width - 1) / 2)
        ax.plot([cx], [cy], marker="+", color="black", markersize=9)
        ratios = "  ".join(f"{t:g}:{v:.3f}" for t, v in sorted(r.ratios.items()))
        ax.set_title(f"{r.label} ({r.init})\narea ratio {ratios}", fontsize=7.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.85, label="share of total input contribution per pixel (log)")
    probes = [*dict.fromkeys(r.probe for r in results if r.probe)]
    note = "area ratios: squares centred on the probed unit's receptive-field centre (+)"
    fig.suptitle("\n".join(t for t in (title, *probes, note) if t), fontsize=8)
    return fig


def run(models: list[str], images: Path | None = None, size: int = 224, out: Path = Path("erf.png"),
        random_init: bool = False, device: str = "auto", mean_std: list[float] | None = None, title: str = "",
        progress: bool | None = None) -> list[ErfResult]:
    """Effective receptive fields of backbones: heatmaps on one colour scale and high-contribution area ratios at
    0.2/0.3/0.5/0.99 (printed, and saved as JSON next to the figure).

    Args:
        models: Zoo names (e.g. vmamba2d_nano.digits), ARCH=CHECKPOINT, or timm names (random init).
        images: Folder of images (default: scikit-image's bundled natural photos).
        size: Side the images are resized to.
        out: Figure path; the numbers go to the same name with .json.
        random_init: Add a row of the same models at random initialisation.
        device: "auto" (CUDA when available), "cpu", "cuda", ...
        mean_std: Input normalisation: 3 means then 3 stds (default: the zoo entry's, else the timm cfg's).
        title: Figure title.
        progress: Progress bar over models (None: only on a terminal).
    """
    if mean_std is not None and len(mean_std) != 6:
        raise ValueError(f"erf: mean_std takes 3 means then 3 stds, got {len(mean_std)} values")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    pixels, names = load_images(images, size)
    norm = (tuple(mean_std[:3]), tuple(mean_std[3:])) if mean_std else None
    results = compute(models, pixels, random_init=random_init, device=device, mean_std=norm, progress=progress)
    print(f"ERF area ratios on {len(names)} images at {size}x{size} ({', '.join(names)})")
    print(f"{'model':<28}{'init':<9}" + "".join(f"{f'r@{t:g}':>9}" for t in THRESHOLDS))
    for r in results:
        print(r.row())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, title).savefig(out, dpi=130)
    numbers = {
        "images": names, "size": size, "thresholds": [*THRESHOLDS],
        "results": [{**{k: v for k, v in asdict(r).items() if k != "share"}, "centroid": centroid(r.share)}
                    for r in results],
    }
    out.with_suffix(".json").write_text(json.dumps(numbers, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return results
