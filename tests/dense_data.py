"""Tiny ADE20K and COCO datasets in the real on-disk formats, drawn with simple shapes (for the dense-task tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Colours per ADE label: 1 = background "wall", 2 = square, 3 = disc (0 stays "other" -> ignored).
ADE_COLOURS = {1: (40, 40, 40), 2: (220, 60, 60), 3: (60, 200, 80)}


def draw_scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    """An RGB image and its ADE label PNG: a square (label 2) and a disc (label 3) on a wall (label 1), with a
    thin unlabelled (0) frame."""
    label = Image.new("L", (size, size), 1)
    draw = ImageDraw.Draw(label)
    half = size // 2
    s = int(rng.integers(size // 5, size // 3))
    x, y = int(rng.integers(2, half - s)), int(rng.integers(2, size - s - 2))
    draw.rectangle([x, y, x + s, y + s], fill=2)
    r = int(rng.integers(size // 10, size // 6))
    cx, cy = int(rng.integers(half + r, size - r - 2)), int(rng.integers(r + 2, size - r - 2))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=3)
    draw.rectangle([0, 0, size - 1, size - 1], outline=0)
    labels = np.array(label)
    rgb = np.zeros((size, size, 3), dtype=np.float64)
    for value, colour in ADE_COLOURS.items():
        rgb[labels == value] = colour
    rgb += rng.normal(0, 8, rgb.shape)  # noise so that the task is not a colour lookup of exact values
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), label


def make_ade20k(root: Path, n_train: int = 4, n_val: int = 2, size: int = 64, seed: int = 0,
                same_val_as_train: bool = False) -> Path:
    """`root/ADEChallengeData2016/{images,annotations}/{training,validation}` with JPEG images and PNG labels."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    scenes = {"training": [draw_scene(rng, size) for _ in range(n_train)]}
    scenes["validation"] = scenes["training"][:n_val] if same_val_as_train else [
        draw_scene(rng, size) for _ in range(n_val)]
    for split, items in scenes.items():
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(items):
            name = f"ADE_{split[:5]}_{i:08d}"
            image.save(base / "images" / split / f"{name}.jpg", quality=95)
            label.save(base / "annotations" / split / f"{name}.png")
    return base


def _polygon_square(x: float, y: float, s: float) -> list[float]:
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def _polygon_disc(cx: float, cy: float, r: float, points: int = 24) -> list[float]:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1).round(2).flatten().tolist()


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as its crowd annotations store it): run lengths over the column-major pixels,
    starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int64)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": list(mask.shape)}


# Non-contiguous COCO category ids on purpose: the DataModule must map them to 1..K.
COCO_CATEGORIES = [{"id": 3, "name": "square", "supercategory": "shape"},
                   {"id": 7, "name": "disc", "supercategory": "shape"}]


def make_coco(root: Path, split: str = "train2017", n_images: int = 4, size: int = 96, seed: int = 0,
              empty_images: int = 0, crowd: bool = False) -> tuple[Path, Path]:
    """COCO instances JSON with polygon segmentations + JPEG images: squares (category 3) and discs (category 7).

    `empty_images` extra images have no annotation; `crowd` adds one iscrowd=1 region (RLE) to the first image.
    Returns (image folder, annotation file).
    """
    rng = np.random.default_rng(seed)
    images_dir = root / split
    images_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(n_images + empty_images):
        image_id = 1000 + index
        canvas = Image.new("RGB", (size, size), (40, 40, 40))
        draw = ImageDraw.Draw(canvas)
        if index < n_images:
            objects = int(rng.integers(1, 3))
            cells = rng.permutation(4)[: objects + 1]  # one quadrant per object: no overlaps
            for k, cell in enumerate(cells):
                qx, qy = int(cell % 2) * size // 2, int(cell // 2) * size // 2
                extent = int(rng.integers(size // 5, size // 3))
                span = size // 2 - extent - 1
                x, y = qx + int(rng.integers(2, span)), qy + int(rng.integers(2, span))
                if k % 2 == 0:
                    polygon, category, colour = _polygon_square(x, y, extent), 3, (220, 60, 60)
                else:
                    r = extent / 2
                    polygon, category, colour = _polygon_disc(x + r, y + r, r), 7, (60, 200, 80)
                draw.polygon(polygon, fill=colour)
                xs, ys = polygon[0::2], polygon[1::2]
                bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                     "segmentation": [polygon], "area": float(bbox[2] * bbox[3]), "bbox": bbox,
                                     "iscrowd": 0})
        file_name = f"{image_id:012d}.jpg"
        canvas.save(images_dir / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    if crowd and n_images:
        region = np.zeros((size, size), dtype=np.uint8)
        region[: size // 8, : size // 8] = 1
        annotations.append({"id": len(annotations) + 1, "image_id": images[0]["id"], "category_id": 3,
                            "segmentation": uncompressed_rle(region), "area": float(region.sum()),
                            "bbox": [0.0, 0.0, float(size // 8), float(size // 8)], "iscrowd": 1})
    annotation_file = root / "annotations" / f"instances_{split}.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                           "categories": COCO_CATEGORIES}))
    return images_dir, annotation_file
