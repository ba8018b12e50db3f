"""Subcommands built from function signatures: each key's type, default and help come from the functions called.

A command is one or more library functions. Their parameters become the command's options (jsonargparse reads the
types from the signature and the help from the Google-style `Args:` of the docstring), every command takes
`--config` (a YAML of its keys) and `--print_config`, and abbreviated options are rejected. Running the command
calls each function with the keys of its own signature, so a new parameter of a library function appears on the
command line by itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace


def new_parser(description: str | None = None, **kwargs: Any) -> ArgumentParser:
    """A jsonargparse parser that rejects abbreviated options (`--max_epoch` is not `--max_epochs`).

    Args:
        description: Text shown by `--help`.
        **kwargs: More `ArgumentParser` arguments.
    """
    return ArgumentParser(description=description, allow_abbrev=False, **kwargs)


def summary(function: Callable) -> str:
    """The first paragraph of `function`'s docstring, on one line.

    Args:
        function: Any documented callable.
    """
    return " ".join((inspect.getdoc(function) or "").split("\n\n", 1)[0].split())


@dataclass
class Command:
    """A subcommand: its parser and how to run the parsed keys.

    Args:
        parser: The subcommand's parser.
        run: Called with the subcommand's parsed keys; returns an exit status or None (0).
        help: One line for the parent command's list.
        subcommands: Name -> Command below this one (a command group), else empty.
    """

    parser: ArgumentParser
    run: Callable[[Namespace], Any]
    help: str = ""
    subcommands: dict[str, Command] = field(default_factory=dict)


def function_command(*functions: Callable, skip: Iterable[str] = (), run: Callable[[Namespace], Any] | None = None,
                     description: str | None = None, positional: bool = True) -> Command:
    """A command whose options are the parameters of `functions` (minus `skip`), with `--config`.

    Args:
        *functions: Library functions whose parameters become options (a name shared by two is one option).
        skip: Parameters that the command computes itself.
        run: How to run the parsed keys (default: call the single function with its keys).
        description: `--help` text (default: the first function's docstring summary).
        positional: Required parameters are positional arguments (else `--name` options).
    """
    parser = new_parser(description or summary(functions[0]))
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of this command's keys.")
    seen = set(skip)
    for function in functions:
        names = set(inspect.signature(function).parameters)
        parser.add_function_arguments(function, skip=seen, fail_untyped=False, as_positional=positional)
        seen |= names
    if run is None:
        (function,) = functions

        def run(keys: Namespace) -> Any:
            return call(function, keys)

    return Command(parser, run, summary(functions[0]) if description is None else description)


def call(function: Callable, keys: Namespace | dict, **computed: Any) -> Any:
    """Call `function` with the parsed keys named in its signature, plus `computed` values.

    Args:
        function: A library function.
        keys: The parsed keys of the command.
        **computed: Values the command computed for the remaining parameters.
    """
    values = keys.as_dict() if isinstance(keys, Namespace) else dict(keys)
    params = inspect.signature(function).parameters
    return function(**{k: v for k, v in values.items() if k in params and k not in computed}, **computed)


def group_command(description: str, subcommands: dict[str, Command]) -> Command:
    """A command of subcommands (`mamba2d zoo list`); `add_subcommands` attaches them.

    Args:
        description: `--help` text.
        subcommands: Name -> Command.
    """
    parser = new_parser(description)

    def run(keys: Namespace) -> Any:
        name = keys["subcommand"]
        return subcommands[name].run(keys[name])

    return Command(parser, run, description, subcommands)


def add_subcommands(parser: ArgumentParser, commands: dict[str, Command], dest: str = "subcommand") -> None:
    """Attach `commands` to `parser` as required subcommands, and theirs below them (jsonargparse adds the levels
    top-down).

    Args:
        parser: The parent parser.
        commands: Name -> Command.
        dest: Key of the chosen subcommand's name in the parsed namespace.
    """
    action = parser.add_subcommands(dest=dest, required=True)
    for name, command in commands.items():
        action.add_subcommand(name, command.parser, help=command.help)
    for command in commands.values():
        if command.subcommands:
            add_subcommands(command.parser, command.subcommands)
