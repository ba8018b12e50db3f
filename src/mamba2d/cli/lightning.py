"""`mamba2d` command line: LightningCLI over every task (model) and DataModule (data), configured by YAML.

Configs name classes by full import path (e.g. `mamba2d.tasks.classification.ImageClassifier`).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import mamba2d  # noqa: F401  (registers the backbones with timm)

RUN_ROOT = "runs"


def default_loggers(name: str = "mamba2d") -> list:
    """A CSV log always, TensorBoard as well when it is installed; both in runs/<name>/version_<n>."""
    loggers = [lazy_instance(CSVLogger, save_dir=RUN_ROOT, name=name)]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(lazy_instance(TensorBoardLogger, save_dir=RUN_ROOT, name=name))
    return loggers


class Mamba2dCLI(LightningCLI):
    """LightningCLI that adds a rich progress bar unless `--trainer.enable_progress_bar false` is given."""

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        if config.get("enable_progress_bar", True) is not False:
            configured = [c for c in (config.get("callbacks") or []) + callbacks if isinstance(c, ProgressBar)]
            if not configured:
                callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse `args` (default: the command line) and, with `run`, execute the subcommand; returns the CLI object."""
    with warnings.catch_warnings():
        # Passing args in-process (tests, `mamba2d-wsi kfold`) is deliberate, whatever the process's own argv says.
        warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended")
        return Mamba2dCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf", "prog": "mamba2d"},
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "default_root_dir": RUN_ROOT,
                "logger": default_loggers(),
            },
            args=args,  # None: LightningCLI reads the command line itself
            run=run,
            auto_configure_optimizers=False,
        )


def main(args: list[str] | None = None) -> None:
    """Entry point of `mamba2d` and `python -m mamba2d`. Tests call `main([...])` in-process."""
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main()
