#!/usr/bin/env bash
# Scaling check on a 2-GPU machine: ImageNet-recipe runs on 1 GPU (vmamba2d_tiny, vmamba_tiny) and DDP on 2 GPUs, a loss
# comparison 1 GPU vs 2 GPUs at the same global batch, model throughput, and a 2DMambaMIL DDP run.
# Usage: OUT=/some/dir bash tools/gpu_scale_check.sh   (logs and summaries land in $OUT)
set -uo pipefail
OUT=${OUT:-runs/scale}; mkdir -p "$OUT"
WORK=$(mktemp -d)
CFG=configs/classification
nvidia-smi -L
python3 tools/make_synthetic_imagefolder.py "$WORK/imagenet" --classes 100 --train-per-class 64 --val-per-class 8 --workers 16

START=$(date +%s)
budget_left() { [ $(( $(date +%s) - START )) -lt "$1" ]; }  # true while fewer than $1 seconds have passed

recipe() {  # recipe NAME ARCH DEVICES BATCH_PER_GPU EPOCHS [extra args]
  local name=$1 arch=$2 devices=$3 batch=$4 epochs=$5; shift 5
  timeout 150 python3 -m mamba2d fit --config $CFG/imagenet_${arch}_tiny.yaml --trainer.devices "$devices" \
    --trainer.strategy "$([ "$devices" = 1 ] && echo auto || echo ddp)" --trainer.max_epochs "$epochs" \
    --model.init_args.warmup_epochs 1 --model.init_args.lr 5e-4 \
    --data.init_args.root "$WORK/imagenet" --data.init_args.batch_size "$batch" --data.init_args.num_workers 7 \
    --trainer.logger "{class_path: CSVLogger, init_args: {save_dir: $WORK/runs, name: $name}}" \
    --trainer.log_every_n_steps 10 --trainer.enable_progress_bar false \
    --trainer.callbacks+=mamba2d.tasks.monitoring.TrainingSpeed "$@" > "$WORK/$name.log" 2>&1
  echo "== $name exit $?"; grep -E "TrainingSpeed|Error|error" "$WORK/$name.log" | tail -3
  summarize
}
summarize() { python3 tools/summarize_scale_runs.py "$WORK/runs" > "$OUT/summary.txt" 2>&1; }
recipe recipe_vmamba2d_1gpu vmamba2d 1 128 4
recipe recipe_vmamba2d_2gpu vmamba2d 2 128 2

# Same global batch (64) and seed on 1 and 2 GPUs, no stochastic regularisation: per-step losses must agree.
for devices in 1 2; do
  timeout 90 python3 -m mamba2d fit --config $CFG/digits_vmamba2d_nano.yaml --trainer.devices $devices \
    --trainer.strategy "$([ $devices = 1 ] && echo auto || echo ddp)" --trainer.max_steps 40 \
    --trainer.log_every_n_steps 1 --data.init_args.batch_size $((64 / devices)) \
    --model.init_args.backbone_kwargs '{drop_path_rate: 0.0}' --model.init_args.label_smoothing 0.0 \
    --trainer.logger "{class_path: CSVLogger, init_args: {save_dir: $WORK/runs, name: digits_${devices}gpu}}" \
    --trainer.enable_progress_bar false > "$WORK/digits_${devices}gpu.log" 2>&1; echo "== digits ${devices}gpu exit $?"
done
summarize


# 2DMambaMIL under DDP: one bag per rank.
python3 - "$WORK/bags" <<'PY'
import sys
from mamba2d.data.spatial_bags import write_spatial_bags
print(write_spatial_bags(sys.argv[1], {"train": 96, "val": 32, "test": 32}, seed=0))
PY
for devices in 1 2; do
  start=$(date +%s)
  timeout 90 python3 -m mamba2d fit --config configs/wsi/classification_mamba_mil_2d.yaml --trainer.devices $devices \
    --trainer.strategy "$([ $devices = 1 ] && echo auto || echo ddp)" --trainer.max_epochs 2 \
    --data.init_args.features_dir "$WORK/bags" --data.init_args.csv_path "$WORK/bags/labels.csv" \
    --data.init_args.split_dir null --model.init_args.in_dim 16 \
    --trainer.logger "{class_path: CSVLogger, init_args: {save_dir: $WORK/runs, name: mil_${devices}gpu}}" \
    --trainer.enable_progress_bar false > "$WORK/mil_${devices}gpu.log" 2>&1
  echo "== mil ${devices}gpu exit $? seconds $(( $(date +%s) - start ))"; grep -iE "error|exception" "$WORK/mil_${devices}gpu.log" | tail -3
done
summarize

budget_left 330 && recipe recipe_vmamba_1gpu vmamba 1 128 2
budget_left 390 && python3 -m mamba2d.analysis.throughput vmamba2d_tiny vmamba_tiny --batch 128 --modes inference \
  --precisions fp32 fp16 --warmup 10 --iters 10 2>&1 | tail -8 | tee "$OUT/throughput.txt"

summarize; cat "$OUT/summary.txt"
tar czf "$OUT/logs.tgz" -C "$WORK" runs $(cd "$WORK" && ls *.log)
