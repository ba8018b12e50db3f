"""`mamba2d zoo`: list, inspect, download and verify the zoo's checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

from ..checkpoints import CheckpointError
from ..zoo.build import check_file
from ..zoo.files import HOME_ENV, fetch, home, local_path, verify
from ..zoo.registry import Entry, Manifest, shipped_manifest
from .commands import Command, function_command, group_command

__all__ = ["command", "fetch_entry", "info", "list_entries", "verify_files"]


def _manifest(manifest: Path | None) -> Manifest:
    return Manifest.read(manifest) if manifest else shipped_manifest()


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


def list_entries(pattern: str = "*", manifest: Path | None = None) -> int:
    """List the zoo's entries: whether the manifest records a hash and whether the file is here (`verify` hashes it).

    Args:
        pattern: Shell-style filter on entry names, e.g. 'vmamba2d_*'.
        manifest: A manifest of your own (default: the one shipped).
    """
    zoo = _manifest(manifest)
    header = ("name", "task", "provenance", "manifest sha256", "local file", "metrics")
    rows = [header] + [
        (e.name, e.task, e.provenance, "recorded" if e.verified else "not yet verified",
         "present" if local_path(e, zoo).exists() else "absent", _metric_summary(e))
        for e in map(zoo.get, zoo.names(pattern))
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    print("\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows))
    return 0


def info(name: str, manifest: Path | None = None) -> int:
    """Show everything the manifest says about an entry, and where its file is.

    Args:
        name: Entry name (arch.tag).
        manifest: A manifest of your own (default: the one shipped).
    """
    zoo = _manifest(manifest)
    print(_info(zoo.get(name), zoo))
    return 0


def fetch_entry(name: str, force: bool = False, manifest: Path | None = None, progress: bool | None = None) -> int:
    """Download an entry into the cache and check its sha256.

    Args:
        name: Entry name (arch.tag).
        force: Download again even when the file is present.
        manifest: A manifest of your own (default: the one shipped).
        progress: Show a download progress bar (default: when stderr is a terminal).
    """
    zoo = _manifest(manifest)
    print(f"{name}: {fetch(zoo.get(name), zoo, force=force, progress=progress)}")
    return 0


def verify_files(names: list[str] | None = None, file: Path | None = None, arch: str | None = None,
                 manifest: Path | None = None) -> int:
    """Check local files: sha256 against the manifest, then the converter self-check (strict load, norm eps, the
    published metrics to compare with). Exit status 0 when every check passes, 1 when one fails, 2 on a file the zoo
    cannot read.

    Args:
        names: Entry names (default: every entry whose file is present).
        file: A checkpoint file to check instead, e.g. a downloaded official one.
        arch: Architecture to load the file into (default: the entry's, else inferred).
        manifest: A manifest of your own (default: the one shipped).
    """
    zoo = _manifest(manifest)
    try:
        if file is not None:
            result = check_file(file, arch, zoo)
            print(result.describe())
            return 0 if result.ok else 1
        ok = True
        for name in names or [n for n in zoo.names() if local_path(zoo.get(n), zoo).exists()]:
            hashed = verify(zoo.get(name), zoo)
            if not hashed.present or (hashed.expected and not hashed.ok):
                print(hashed.describe())
                ok = False
                continue
            result = check_file(hashed.path, arch, zoo)
            print(f"{name}\n{result.describe()}\n")
            ok = ok and result.ok
        return 0 if ok else 1
    except CheckpointError as exc:
        print(f"mamba2d zoo verify: {exc}", file=sys.stderr)
        return 2


def command() -> Command:
    """The `mamba2d zoo` command group."""
    return group_command(
        f"The mamba2d model zoo: list, inspect, download and verify checkpoints (cache: ${HOME_ENV}, now {home()}).",
        {"list": function_command(list_entries), "info": function_command(info),
         "fetch": function_command(fetch_entry), "verify": function_command(verify_files)},
    )
