"""TrainingSpeed on a real CPU fit: what it counts and what it leaves out."""

import json
import time

from lightning.pytorch import Callback, Trainer

from mamba2d.data.digits import DigitsDataModule
from mamba2d.tasks.classification import ImageClassifier
from mamba2d.tasks.monitoring import TrainingSpeed


class SlowValidation(Callback):
    def on_validation_epoch_start(self, trainer, pl_module):
        time.sleep(1.0)


def test_training_speed_counts_timed_steps_and_leaves_out_validation(tmp_path):
    class Clock(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2 and not hasattr(self, "start"):
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.wall = time.perf_counter() - self.start

    clock = Clock()
    trainer = Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=4, limit_val_batches=1, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0,
                      default_root_dir=str(tmp_path),
                      callbacks=[clock, TrainingSpeed(warmup_steps=2), SlowValidation()])
    model = ImageClassifier(backbone="vmamba2d_nano", num_classes=10, backbone_kwargs={"dims": 16})
    trainer.fit(model, DigitsDataModule(batch_size=8))
    result = json.loads((tmp_path / "training_speed.json").read_text())
    assert result["timed_steps"] == 6  # 8 steps, the first 2 warm up
    assert result["samples_per_s"] == result["timed_steps"] * 8 / result["timed_seconds"]
    # Two validation passes of at least 1 s each fell inside the wall-clock window, none inside the timed one.
    assert result["timed_seconds"] < clock.wall - 1.9
    assert result["timed_seconds"] > 0
