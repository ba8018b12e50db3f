"""`mamba2d-zoo`: list, inspect, download and verify the zoo's checkpoints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from ..checkpoints import CheckpointError
from .build import check_file
from .files import HOME_ENV, fetch, home, local_path, verify
from .registry import Entry, Manifest, shipped_manifest

__all__ = ["main"]


def _info(entry: Entry, manifest: Manifest) -> str:
    lines = [f"{entry.name}"]
    for key in ("arch", "task", "provenance", "license", "layout", "kwargs", "file", "url", "sha256", "size",
                "status", "metrics", "input", "recipe", "notes"):
        value = getattr(entry, key)
        if value not in (None, {}, ()):
            lines.append(f"  {key:<10} {value}")
    path = local_path(entry, manifest)
    lines.append(f"  {'local':<10} {path}{'' if path.exists() else ' (not present)'}")
    return "\n".join(lines)


def _metric_summary(entry: Entry) -> str:
    return ", ".join(f"{k}={v}" for k, v in entry.metrics.items() if isinstance(v, (int, float)))


def _table(manifest: Manifest, pattern: str) -> list[str]:
    """One row per entry: whether the manifest records a hash, whether the file is here (not hashed: `verify`)."""
    header = ("name", "task", "provenance", "manifest sha256", "local file", "metrics")
    rows = [header] + [
        (e.name, e.task, e.provenance, "recorded" if e.verified else "not yet verified",
         "present" if local_path(e, manifest).exists() else "absent", _metric_summary(e))
        for e in map(manifest.get, manifest.names(pattern))
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]


def _verify(manifest: Manifest, names: Iterable[str], file: Path | None, arch: str | None) -> int:
    """0 when every check passes, 1 when one fails, 2 on a file the zoo cannot read."""
    try:
        if file is not None:
            result = check_file(file, arch, manifest)
            print(result.describe())
            return 0 if result.ok else 1
        ok = True
        for name in names or [n for n in manifest.names() if local_path(manifest.get(n), manifest).exists()]:
            hashed = verify(manifest.get(name), manifest)
            if not hashed.present or (hashed.expected and not hashed.ok):
                print(hashed.describe())
                ok = False
                continue
            result = check_file(hashed.path, arch, manifest)
            print(f"{name}\n{result.describe()}\n")
            ok = ok and result.ok
        return 0 if ok else 1
    except CheckpointError as exc:
        print(f"mamba2d-zoo verify: {exc}", file=sys.stderr)
        return 2


def main(argv: Iterable[str] | None = None) -> int:
    """Run `mamba2d-zoo` with `argv` (default: the command line); returns the exit status.

    Args:
        argv: Arguments without the program name.
    """
    parser = argparse.ArgumentParser(prog="mamba2d-zoo", description="The mamba2d model zoo: list, inspect, "
                                     f"download and verify checkpoints (cache: ${HOME_ENV}, now {home()}).")
    parser.add_argument("--manifest", type=Path, help="a manifest of your own (default: the one shipped)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list entries")
    p_list.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'vmamba2d_*'")
    for command, text in (("info", "show an entry"), ("fetch", "download an entry into the cache and verify it")):
        sub.add_parser(command, help=text).add_argument("names", nargs="+", help="entry names")
    p_verify = sub.add_parser(
        "verify", help="check local files: sha256 against the manifest, then the converter self-check (strict load, "
        "norm eps, the published metrics to compare with)")
    p_verify.add_argument("names", nargs="*", help="entry names (default: every entry whose file is present)")
    p_verify.add_argument("--file", type=Path,
                          help="a checkpoint file to check instead, e.g. a downloaded official one")
    p_verify.add_argument("--arch", help="architecture to load the file into (default: the entry's, else inferred)")
    args = parser.parse_args(None if argv is None else [*argv])
    manifest = Manifest.read(args.manifest) if args.manifest else shipped_manifest()

    if args.command == "list":
        print("\n".join(_table(manifest, args.pattern)))
        return 0
    if args.command == "info":
        print("\n\n".join(_info(manifest.get(n), manifest) for n in args.names))
        return 0
    if args.command == "fetch":
        for n in args.names:
            print(f"{n}: {fetch(manifest.get(n), manifest)}")
        return 0
    return _verify(manifest, args.names, args.file, args.arch)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
