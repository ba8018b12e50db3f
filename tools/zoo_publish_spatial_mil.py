"""Publish MIL models trained on the synthetic spatial task (docs/wsi.md, "Spatial benchmark") into the zoo.

    python tools/zoo_publish_spatial_mil.py                       # 2DMambaMIL and ABMIL, seed 0

Writes the benchmark's bags for the seed, trains each model exactly as the benchmark does now (its
`BENCHMARK_MODELS` arguments and `benchmark_training` setting, SlideMIL, selection on val AUROC; the published
entries record the arguments they were trained with), writes zoo/<model>.spatial_mil.safetensors from the selected
checkpoint and prints the manifest fields (sha256, size, test metrics of that checkpoint) to paste into
zoo/manifest.yaml.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import mamba2d.zoo as zoo
from mamba2d.data.spatial_bags import BENCHMARK_BAGS, BENCHMARK_SPLITS, write_spatial_bags
from mamba2d.wsi.spatial_benchmark import BENCHMARK_MODELS, benchmark_training, fit_and_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mamba_mil_2d", "abmil"], choices=list(BENCHMARK_MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "zoo")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the benchmark's setting: on bags this small threads cost more than they gain

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "bags"
        write_spatial_bags(data_dir, BENCHMARK_SPLITS, seed=args.seed, config=BENCHMARK_BAGS)
        for model in args.models:
            setting = benchmark_training(model)  # the model's own benchmark setting (lr, weight decay, epochs)
            task, metrics = fit_and_test(model, data_dir, args.seed, setting["epochs"], setting["lr"],
                                         Path(tmp) / model, feature_dim=BENCHMARK_BAGS.feature_dim,
                                         weight_decay=setting["weight_decay"])
            name = f"{model}.spatial_mil"
            path = args.out_dir / f"{name}.safetensors"
            sha256, size = zoo.export(task.model.state_dict(), path, metadata={"arch": model})
            kwargs = {"in_dim": BENCHMARK_BAGS.feature_dim, "num_outputs": 2, **BENCHMARK_MODELS[model]}
            print(f"  - name: {name}\n    arch: {model}\n    kwargs: {kwargs}\n    file: {path.name}")
            print(f"    sha256: {sha256}\n    size: {size}")
            print(f"    metrics: {{test_acc: {metrics['acc']:.4f}, test_auroc: {metrics['auroc']:.4f}}}")


if __name__ == "__main__":
    main()
