"""The `mamba2d` command: one front door over training (LightningCLI) and the tools.

    mamba2d fit|validate|test|predict ...   training and evaluation (LightningCLI, `mamba2d.cli.lightning`)
    mamba2d zoo list|info|fetch|verify      the model zoo
    mamba2d erf | flops | throughput        analysis of backbones
    mamba2d curves RUN_DIR                  training-curve PNGs of a run
    mamba2d wsi extract|heatmap|splits|benchmark
    mamba2d kfold CONFIG [-- LightningCLI arguments]

Every tool subcommand is built by jsonargparse from the signature and Google-style docstring of the library
function it calls (`mamba2d.cli.commands`): per-key `--help`, `--config` (a YAML of its keys) and `--print_config`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jsonargparse import ArgumentParser

from ..analysis import curves, erf, flops, throughput
from . import lightning, wsi, zoo
from .commands import Command, add_subcommands, function_command, new_parser
from .kfold import kfold

__all__ = ["TRAINING", "build_parser", "commands", "main"]

#: Subcommands handed to LightningCLI as they are.
TRAINING = ("fit", "validate", "test", "predict")


def commands() -> dict[str, Command]:
    """The tool subcommands of `mamba2d`, by name."""
    return {
        "zoo": zoo.command(),
        "erf": function_command(erf.run, positional=False),
        "flops": function_command(flops.flops, positional=False),
        "throughput": function_command(throughput.throughput, positional=False),
        "curves": function_command(curves.plot_curves),
        "wsi": wsi.command(),
        "kfold": function_command(kfold),
    }


def build_parser(tools: dict[str, Command] | None = None) -> ArgumentParser:
    """The `mamba2d` parser: the training subcommands (listed; LightningCLI parses them) and the tools.

    Args:
        tools: The tool subcommands (default: `commands()`).
    """
    parser = new_parser("2DMamba: training and evaluation (LightningCLI), the model zoo, analysis and the "
                        "whole-slide pipeline. `mamba2d SUBCOMMAND --help` explains each key.", prog="mamba2d")
    training = {name: Command(new_parser(f"LightningCLI {name}: see `mamba2d {name} --help`."), lambda keys: 0,
                              f"LightningCLI {name} (model, data and trainer from YAML configs)")
                for name in TRAINING}
    add_subcommands(parser, {**training, **(tools or commands())}, dest="command")
    return parser


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of `mamba2d` and `python -m mamba2d`; returns the exit status. Tests call `main([...])`.

    Args:
        args: Arguments without the program name (default: the command line).
    """
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] in TRAINING:
        lightning.main(args)
        return 0
    extra: list[str] = []
    if "--" in args:  # LightningCLI arguments for every fold of `mamba2d kfold`
        cut = args.index("--")
        args, extra = args[:cut], args[cut + 1:]
    tools = commands()
    parser = build_parser(tools)
    keys = parser.parse_args(args)
    keys = parser.instantiate_classes(keys)  # dataclass-typed keys (e.g. `wsi benchmark --bags.*`) become instances
    name = keys["command"]
    if extra:
        if name != "kfold":
            raise SystemExit(f"mamba2d {name}: unexpected arguments after --: {extra}")
        keys[name]["extra"] = [*(keys[name]["extra"] or []), *extra]
    status = tools[name].run(keys[name])
    return status if isinstance(status, int) else 0
