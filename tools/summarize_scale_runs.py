#!/usr/bin/env python
"""Summarise the runs of tools/gpu_scale_check.sh: losses, accuracy, speed, memory, 1-vs-2-GPU loss agreement."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def read_metrics(run: Path) -> list[dict[str, str]]:
    files = sorted(run.glob("version_*/metrics.csv"))
    return list(csv.DictReader(files[-1].open())) if files else []


def series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def main(root: Path) -> None:
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        rows = read_metrics(run)
        losses = series(rows, "train/loss")
        line = f"{run.name}: "
        if losses:
            line += f"train/loss {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f} (step {losses[-1][0]})"
        for key in ("val/acc1", "val/auroc", "val/acc"):
            values = series(rows, key)
            if values:
                line += f"; {key} per epoch " + ", ".join(f"{v:.3f}" for _, v in values)
        speed = sorted(run.glob("version_*/training_speed.json"))
        if speed:
            s = json.loads(speed[-1].read_text())
            line += (f"; {s['samples_per_s']:.0f} samples/s on {s['world_size']} x {s['device']}, "
                     f"peak {s['peak_memory_gb_rank0']:.1f} GB")
        print(line)
    one, two = (dict(series(read_metrics(root / f"digits_{n}gpu"), "train/loss")) for n in (1, 2))
    common = sorted(set(one) & set(two))
    if common:
        diffs = [abs(one[s] - two[s]) for s in common]
        print(f"digits loss, 1 GPU (batch 64) vs 2 GPUs (2 x 32): {len(common)} steps, max |diff| {max(diffs):.2e}, "
              f"first {one[common[0]]:.4f}/{two[common[0]]:.4f}, last {one[common[-1]]:.4f}/{two[common[-1]]:.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
