"""Publish a digits classifier trained with configs/classification/digits_*.yaml into the zoo.

    python tools/zoo_publish_digits.py --arch vmamba2d_nano \
        --ckpt runs/digits_vmamba2d_nano/version_0/checkpoints/best.ckpt

Reads the Lightning checkpoint safely (mamba2d.zoo.read_model_weights), loads it strictly into the timm model,
measures test accuracy on DigitsDataModule's fixed test split, writes zoo/<arch>.digits.safetensors and prints the
manifest fields (sha256, size, metrics) to paste into zoo/manifest.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

import mamba2d.zoo as zoo
from mamba2d.data.digits import DigitsDataModule
from mamba2d.models import input_normalization


@torch.no_grad()
def digits_test_accuracy(model: torch.nn.Module, image_size: int = 32) -> tuple[int, int]:
    data = DigitsDataModule(batch_size=128, image_size=image_size)
    data.setup("test")
    model.eval()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in input_normalization(model))
    correct = total = 0
    for images, labels in data.test_dataloader():
        correct += int((model((images - mean) / std).argmax(dim=1) == labels).sum())
        total += len(labels)
    return correct, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=["vmamba2d_nano", "vmamba_nano"])
    parser.add_argument("--ckpt", type=Path, required=True, help="Lightning checkpoint (best on val/acc1)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "zoo")
    args = parser.parse_args()

    weights = zoo.read_model_weights(args.ckpt)
    model = timm.create_model(args.arch, num_classes=10)
    zoo.load_into(model, weights, str(args.ckpt))
    correct, total = digits_test_accuracy(model)
    name = f"{args.arch}.digits"
    path = args.out_dir / f"{name}.safetensors"
    sha256, size = zoo.export(model.state_dict(), path, metadata={"arch": args.arch, "num_classes": "10"})
    print(f"# {name}: test accuracy {correct}/{total} = {correct / total:.4f}")
    print(f"    file: {path.name}\n    sha256: {sha256}\n    size: {size}")
    print(f"    metrics: {{test_acc1: {correct / total:.4f}, test_correct: {correct}, test_images: {total}}}")


if __name__ == "__main__":
    main()
