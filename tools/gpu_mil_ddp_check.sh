#!/usr/bin/env bash
# 2DMambaMIL under DDP on 2 GPUs (one bag per rank and step) against one GPU accumulating the same two bags per
# step, and one GPU taking one bag per step (a control that must differ): same seed, no dropout, 8 training bags.
# Prints the largest weight difference of each run against the DDP run. Usage: OUT=dir bash tools/gpu_mil_ddp_check.sh
# (ACCEL=cpu runs the same check on CPU processes, gloo).
set -uo pipefail
OUT=${OUT:-runs/mil_ddp}; mkdir -p "$OUT"
REPO=$(pwd); WORK=$(mktemp -d)
python3 - "$WORK/bags" <<'PY'
import sys
from mamba2d.data.spatial_bags import SpatialBagConfig, write_spatial_bags
write_spatial_bags(sys.argv[1], {"train": 8, "val": 4, "test": 2}, seed=0, config=SpatialBagConfig(grid_max=24))
PY
fit() {  # fit NAME DEVICES [extra args]
  local name=$1 devices=$2; shift 2
  local rc=0
  mkdir -p "$WORK/$name"
  (cd "$WORK/$name" && python3 -m mamba2d fit --config "$REPO/configs/wsi/classification_mamba_mil_2d.yaml" \
    --trainer.accelerator "${ACCEL:-gpu}" --trainer.devices "$devices" \
    --trainer.strategy "$([ "$devices" = 1 ] && echo auto || echo ddp)" --trainer.max_epochs 1 \
    --trainer.logger false --trainer.enable_progress_bar false --model.init_args.in_dim 16 \
    --model.init_args.model_args '{dropout: 0.0}' --data.init_args.features_dir "$WORK/bags" \
    --data.init_args.csv_path "$WORK/bags/labels.csv" --data.init_args.split_dir null "$@" > "$WORK/$name.log" 2>&1) \
    || rc=$?
  echo "== $name exit $rc"; [ "$rc" = 0 ] || tail -20 "$WORK/$name.log"
}
fit ddp2 2
fit accumulate1 1 --trainer.accumulate_grad_batches 2
fit single1 1
python3 - "$WORK" <<'PY' | tee "$OUT/mil_ddp.txt"
import sys
from pathlib import Path
import torch
work = Path(sys.argv[1])
load = lambda name: torch.load(next((work / name).rglob("last.ckpt")), weights_only=False, map_location="cpu")
ddp = load("ddp2")
for name in ("accumulate1", "single1"):
    other = load(name)
    diffs = {k: (w - other["state_dict"][k]).abs() for k, w in ddp["state_dict"].items()}
    worst = max(diffs, key=lambda k: diffs[k].max().item())
    total = sum(d.square().sum() for d in diffs.values()).sqrt() / sum(
        w.square().sum() for w in ddp["state_dict"].values()).sqrt()
    print(f"2 GPUs x 1 bag (step {ddp['global_step']}) vs {name} (step {other['global_step']}): relative weight "
          f"difference {total.item():.2e}, largest element difference {diffs[worst].max().item():.2e} ({worst})")
PY
