"""Run by test_distributed_data.py: one epoch of the digits task under DDP on CPU (gloo), recording what each rank
sees. Lightning's DDP launcher re-runs this script for rank 1."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from mamba2d.data.digits import DigitsDataModule
from mamba2d.tasks.classification import ImageClassifier


def image_keys(images: torch.Tensor) -> list[str]:
    # hashlib, not hash(): str/bytes hashes are salted per process, and the ranks are separate processes
    return [hashlib.sha1(img.numpy().tobytes()).hexdigest()[:12] for img in images]


class RecordSeen(Callback):
    def __init__(self):
        self.seen = {"train": [], "val": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen["train"] += image_keys(batch[0])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.seen["val"] += image_keys(batch[0])


def main(out: Path) -> None:
    seed_everything(0)
    record = RecordSeen()
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                      enable_progress_bar=False, num_sanity_val_steps=0, callbacks=[record],
                      default_root_dir=str(out))
    model = ImageClassifier(backbone="vmamba2d_nano", num_classes=10, lr=2e-3)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    rank = trainer.global_rank
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": record.seen, "metrics": metrics}))
    if rank == 0:
        torch.save(model.model.state_dict(), out / "weights.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
