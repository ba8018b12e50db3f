#!/usr/bin/env python
"""Write a synthetic ImageNet-style folder (`root/{train,val}/<class>/<i>.jpg`) whose classes are learnable.

Each class is a sinusoidal grating with its own orientation, frequency and colour, under noise and a random phase,
so a recipe run on it shows a falling loss (unlike torchvision's FakeData, whose labels are unrelated to pixels).
Used for GPU throughput and multi-GPU checks where ImageNet is not available.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def class_image(label: int, index: int, size: int, num_classes: int) -> np.ndarray:
    rng = np.random.default_rng(label * 1_000_003 + index)
    angle = np.pi * label / num_classes
    frequency = 2 + 6 * ((label * 7) % num_classes) / num_classes
    colour = np.array([(label * 37) % 255, (label * 91) % 255, (label * 151) % 255]) / 255.0
    yy, xx = np.mgrid[0:size, 0:size] / size
    wave = np.sin(2 * np.pi * frequency * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    image = 0.5 + 0.35 * wave[..., None] * colour[None, None] + 0.1 * rng.standard_normal((size, size, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def write_class(args: tuple[Path, int, int, int, int]) -> None:
    root, label, count, size, num_classes = args
    folder = root / f"class_{label:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(class_image(label, index + (0 if root.name == "train" else 10**6), size, num_classes)).save(
            folder / f"{index}.jpg", quality=90
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--val-per-class", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    jobs = [(args.root / split, label, count, args.size, args.classes)
            for split, count in (("train", args.train_per_class), ("val", args.val_per_class))
            for label in range(args.classes)]
    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(write_class, jobs))
    print(f"wrote {args.classes} classes to {args.root} ({args.train_per_class} train, {args.val_per_class} val each)")


if __name__ == "__main__":
    main()
