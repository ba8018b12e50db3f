"""`mamba2d fit|validate|test|predict`: LightningCLI over every task (model) and DataModule (data), configured by YAML.

Classes go by their short names (`--model ImageClassifier`, `--data DigitsDataModule`, `class_path:
BestCheckpoint` in a config) because the tasks, DataModules and callbacks are imported before parsing; full import
paths work as well. The data decides what the model must agree with: `task`, `num_classes` and `num_bins` are
linked from the DataModule to the task, so a config writes them once, on the data side (or not at all when the
data knows them, e.g. from its folders or CSV). Configs are read in jsonargparse's `omegaconf+` mode: a logger's
`save_dir: ${trainer.default_root_dir}` follows `--trainer.default_root_dir` given anywhere on the command line.

Two callbacks are added when the config has none of their kind, through the public `before_instantiate_classes`
hook: a rich progress bar (unless `--trainer.enable_progress_bar false`) and a `LearningRateMonitor` (when a
logger is configured).

Runs stay tidy:
- `validate`, `test` and `predict` with `--ckpt_path <run>/checkpoints/<file>` write beside that run, into
  `<run>/<subcommand>/` (`<run>/test_1/`, ... when it exists), not into a new `version_N`: the loggers' `save_dir`,
  `name` and `version` and the trainer's `default_root_dir` (which prediction writers follow) are set before the
  classes are instantiated.
- A `--ckpt_path` file is checked (`mamba2d.checkpoints.check_checkpoint_file`) before anything is built, so a
  truncated or foreign file is named as such.
- A command that fails removes the run folder it created when that folder holds no more than its config, hparams
  and TensorBoard header files.

Lightning's "💡 Tip" advertisements (litlogger, litmodels) are filtered out of its log; its other messages and
warnings are kept.
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from pathlib import Path

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import mamba2d  # noqa: F401  (registers the backbones with timm)

from ..checkpoints import check_checkpoint_file

# Every DataModule, task and callback is imported before parsing, so that short class names resolve.
from ..data import ade20k, coco, digits, images, slides  # noqa: F401
from ..tasks import checkpointing, classification, detection, mil, segmentation  # noqa: F401

RUN_ROOT = "runs"

#: `ckpt_path` values that Lightning resolves itself (not files).
LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")

#: Subcommands that write beside the run of their `--ckpt_path`.
EVALUATION_SUBCOMMANDS = ("validate", "test", "predict")

#: Files a run folder may hold and still be empty of results (written before the first step).
START_UP_FILES = ("config.yaml", "hparams.yaml", "events.out.tfevents.*")

#: (DataModule attribute, task argument) pairs: the task takes the data's value when the DataModule has it.
DATA_TO_MODEL_LINKS = (("num_classes", "num_classes"), ("task", "task"), ("num_bins", "num_bins"))


def _linked_keys_set(args: list[str]) -> list[str]:
    """Where the command line or a `--config` file sets a model key that the CLI links from the data (the link
    would silently replace it)."""
    targets = [target for _, target in DATA_TO_MODEL_LINKS]
    found = []
    for i, token in enumerate(args):
        key, _, inline = token.partition("=")
        found += [f"{key} on the command line" for t in targets if key in (f"--model.init_args.{t}", f"--model.{t}")]
        path = Path(inline or (args[i + 1] if i + 1 < len(args) else "")) if key in ("--config", "-c") else None
        if path is not None and path.is_file():
            model = (yaml.safe_load(path.read_text()) or {}).get("model")
            if isinstance(model, dict):
                keys = set(model) | set(model.get("init_args") or {})
                found += [f"model.init_args.{t} in {path}" for t in targets if t in keys]
    return found


def _resolve_class(class_path: str) -> type | None:
    """The class a callback entry names (full import path), or None when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError, ValueError):
        return None


class Mamba2dCLI(LightningCLI):
    """LightningCLI with the data → model links, the default progress bar and learning-rate monitor, checked
    checkpoints, evaluation beside the checkpoint's run, and no run folder left behind by a failed command."""

    def __init__(self, *args, **kwargs) -> None:
        """Run LightningCLI; when it fails, remove the run folders this command created that hold no results.

        Args:
            *args: LightningCLI's positional arguments.
            **kwargs: LightningCLI's keyword arguments.
        """
        self._fresh_run_dirs: list[Path] = []
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            for folder in self._fresh_run_dirs:
                if folder.is_dir() and all(
                    any(f.match(pattern) for pattern in START_UP_FILES) for f in folder.rglob("*") if f.is_file()
                ):
                    shutil.rmtree(folder)
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the DataModule's `task`, `num_classes` and `num_bins` to the task's arguments of the same name.

        A link applies only when the DataModule has the attribute and the task the argument; the linked value
        replaces any value the config gives the task.

        Args:
            parser: The subcommand's parser.
        """
        for source, target in DATA_TO_MODEL_LINKS:
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse the arguments, then check a `--ckpt_path` file before LightningCLI reads its hyperparameters.

        Args:
            parser: The CLI's parser.
            args: Command-line arguments (None: the process's own).

        Raises:
            CheckpointError: The `--ckpt_path` file is missing, empty, truncated or not a checkpoint.
            ValueError: A model key that the CLI links from the data (`DATA_TO_MODEL_LINKS`) is set by hand.
        """
        raw = sys.argv[1:] if args is None else args
        given = _linked_keys_set([str(a) for a in raw]) if isinstance(raw, (list, tuple)) else []
        if given:
            raise ValueError(f"{'; '.join(given)}: the CLI sets the model's "
                             f"{', '.join(t for _, t in DATA_TO_MODEL_LINKS)} from the DataModule; set them in the "
                             "data section (--data.init_args.KEY) and remove them from the model")
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if _is_local_file(ckpt_path):
            check_checkpoint_file(ckpt_path)

    def before_instantiate_classes(self) -> None:
        """Add a `RichProgressBar` and a `LearningRateMonitor` to `trainer.callbacks` when none of their kind is
        configured (and, respectively, the progress bar is enabled and a logger is configured)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        callbacks = list(trainer.callbacks or [])
        kinds = [_resolve_class(c.class_path) for c in callbacks if isinstance(c, Namespace) and "class_path" in c]
        configured = lambda kind: any(isinstance(k, type) and issubclass(k, kind) for k in kinds)  # noqa: E731
        if trainer.enable_progress_bar is not False and not configured(ProgressBar):
            callbacks.append(Namespace(class_path="lightning.pytorch.callbacks.RichProgressBar"))
        has_logger = trainer.logger is not False and trainer.logger != []  # None: Lightning's default logger
        if has_logger and not configured(LearningRateMonitor):
            callbacks.append(Namespace(class_path="lightning.pytorch.callbacks.LearningRateMonitor",
                                       init_args=Namespace(logging_interval="step")))
        trainer.callbacks = callbacks
        ckpt_path = config.get("ckpt_path") if self.subcommand else None
        if self.subcommand in EVALUATION_SUBCOMMANDS and _is_local_file(ckpt_path):
            _write_beside_run(trainer, Path(ckpt_path), self.subcommand)
        _share_logger_version(trainer.logger)

    def _note_fresh_run_dirs(self) -> None:
        """Record the topmost folder each logger is about to create, to remove it should the command fail."""
        for logger in self.trainer.loggers:
            folder = Path(logger.log_dir) if logger.log_dir else None
            while folder is not None and not folder.parent.exists():
                folder = folder.parent
            if folder is not None and not folder.exists():
                self._fresh_run_dirs.append(folder)

    def before_fit(self) -> None:
        """Note the run folders that `fit` creates."""
        self._note_fresh_run_dirs()

    def before_validate(self) -> None:
        """Note the run folders that `validate` creates."""
        self._note_fresh_run_dirs()

    def before_test(self) -> None:
        """Note the run folders that `test` creates."""
        self._note_fresh_run_dirs()

    def before_predict(self) -> None:
        """Note the run folders that `predict` creates."""
        self._note_fresh_run_dirs()


class _NoAdvertisements(logging.Filter):
    """Drops Lightning's "💡 Tip: ... litlogger / litmodels" lines: advertisements for cloud services, printed on
    every run, that Lightning offers no setting to turn off. Every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_QUIET_TIPS = _NoAdvertisements()


def _is_local_file(ckpt_path) -> bool:
    """Whether a `ckpt_path` names a local file (not None, not one of Lightning's names, not a URL)."""
    return (isinstance(ckpt_path, (str, Path)) and str(ckpt_path).split(":")[0] not in LIGHTNING_CKPT_NAMES
            and "://" not in str(ckpt_path))


def _write_beside_run(trainer: Namespace, ckpt_path: Path, subcommand: str) -> None:
    """Point the loggers and `default_root_dir` at `<run>/<subcommand>` (or `<subcommand>_1`, ... when it exists)
    for a checkpoint in `<run>/checkpoints/`; a checkpoint elsewhere leaves them as configured."""
    if ckpt_path.parent.name != "checkpoints":
        return
    run = ckpt_path.resolve().parent.parent
    folder, n = run / subcommand, 0
    while folder.exists():
        n += 1
        folder = run / f"{subcommand}_{n}"
    trainer.default_root_dir = str(folder)
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for logger in loggers:
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is not None and "save_dir" in init:
            init.save_dir, init.name, init.version = str(run), "", folder.name


def _share_logger_version(loggers) -> None:
    """Give loggers that write to the same `save_dir/name` folder one version (the next free `version_N`).

    Each of Lightning's file loggers picks the next free version itself when it first writes, so a CSV and a
    TensorBoard logger of one run would land in `version_0` and `version_1`.
    """
    if not isinstance(loggers, list):
        return
    groups: dict[tuple[str, str], list[Namespace]] = {}
    for logger in loggers:
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is not None and init.get("save_dir") is not None and init.get("version") is None:
            groups.setdefault((str(init.save_dir), str(init.get("name") or "")), []).append(init)
    for (save_dir, name), members in groups.items():
        if len(members) < 2:
            continue
        folder = Path(save_dir) / name
        taken = [int(p.name[8:]) for p in folder.glob("version_*") if p.is_dir() and p.name[8:].isdigit()]
        for init in members:
            init.version = f"version_{max(taken, default=-1) + 1}"


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse `args` and, with `run`, execute the subcommand.

    Args:
        args: Command-line arguments (None: the process's own). With `run`, they start with the subcommand.
        run: Execute the subcommand; False only parses and instantiates (no subcommand in `args`).

    Returns:
        The CLI object (`model`, `datamodule`, `trainer`).
    """
    # Lightning's rank-zero messages go through this logger; a filter (the logging module's public API) drops only
    # the tips, and adding the same filter again is a no-op.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_QUIET_TIPS)
    with warnings.catch_warnings():
        # Passing args in-process (tests, `mamba2d kfold`) is deliberate, whatever the process's own argv says.
        warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended")
        return Mamba2dCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf+", "prog": "mamba2d", "allow_abbrev": False},
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"default_root_dir": RUN_ROOT},
            args=args,  # None: LightningCLI reads the command line itself
            run=run,
            auto_configure_optimizers=False,
        )


def main(args: list[str] | None = None) -> None:
    """Run `mamba2d fit|validate|test|predict ...`; tests call `main([...])` in-process.

    Args:
        args: Command-line arguments starting with the subcommand (None: the process's own).
    """
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main()
