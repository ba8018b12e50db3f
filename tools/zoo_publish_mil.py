"""Train 2DMambaMIL and ABMIL on the synthetic spatial MIL task and publish them into the zoo.

    python tools/zoo_publish_mil.py --work /tmp/zoo_mil

The bags come from `mamba2d.data.spatial_bags.write_spatial_bags` (seed 0; 128 train, 32 val, 64 test bags of
16-dim features; label = compact vs scattered arrangement of the positive patches). Each model is trained with
`mamba2d.tasks.mil.SlideMIL` (model selection on val AUROC), its best checkpoint is read safely, its test accuracy
is measured bag by bag, and zoo/<model>.spatial.safetensors is written with the manifest fields printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

import mamba2d.zoo as zoo
from mamba2d.data.slides import SlideBagDataModule
from mamba2d.data.spatial_bags import SpatialBagConfig, write_spatial_bags
from mamba2d.models.mil import create_mil_model
from mamba2d.tasks.mil import SlideMIL

SPLITS = {"train": 128, "val": 32, "test": 64}
FEATURE_DIM = SpatialBagConfig().feature_dim
MODELS = {"mamba_mil_2d": {"dim": 32}, "abmil": {"dim": 32, "attn_dim": 32}}


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, data: SlideBagDataModule) -> tuple[int, int]:
    model.eval()
    correct = total = 0
    for bag in data.test_dataloader():
        logits = model(bag["features"], bag["positions"], bag.get("segments")).logits
        correct += int(logits.argmax() == bag["label"])
        total += 1
    return correct, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch directory for bags and runs")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "zoo")
    args = parser.parse_args()

    bags = args.work / "bags"
    write_spatial_bags(bags, SPLITS, seed=0)
    for name, model_args in MODELS.items():
        seed_everything(0, workers=True)
        data = SlideBagDataModule(str(bags), str(bags / "labels.csv"))
        task = SlideMIL(name, in_dim=FEATURE_DIM, num_classes=2, model_args=model_args, lr=1e-3, weight_decay=1e-5)
        trainer = Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                          enable_progress_bar=False, default_root_dir=str(args.work / name))
        trainer.fit(task, datamodule=data)
        best = Path(trainer.checkpoint_callback.best_model_path)
        (metrics,) = trainer.test(task, datamodule=data, ckpt_path=str(best), verbose=False)

        model = create_mil_model(name, in_dim=FEATURE_DIM, num_outputs=2, **model_args)
        zoo.load_into(model, zoo.read_model_weights(best), str(best))
        data.setup("test")
        correct, total = test_accuracy(model, data)
        path = args.out_dir / f"{name}.spatial.safetensors"
        sha256, size = zoo.export(model.state_dict(), path, metadata={"arch": name})
        print(f"# {name}.spatial: test accuracy {correct}/{total} = {correct / total:.4f}; "
              f"Lightning test/acc {metrics['test/acc']:.4f} test/auroc {metrics['test/auroc']:.4f}")
        print(f"    file: {path.name}\n    sha256: {sha256}\n    size: {size}")
        print(f"    metrics: {{test_acc: {correct / total:.4f}, test_auroc: {metrics['test/auroc']:.4f}, "
              f"test_correct: {correct}, test_bags: {total}}}")


if __name__ == "__main__":
    main()
