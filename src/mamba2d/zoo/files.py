"""Where the zoo's files live, downloading them and checking their sha256.

Weights trained here ship beside the manifest; larger ones (VMamba's releases) are downloaded into
`home()/checkpoints`, where `home()` is `$MAMBA2D_HOME` or the user cache directory. Every file is checked against the
manifest's sha256 before it is used. `$MAMBA2D_OFFLINE` set to anything refuses downloads.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoints import UNVERIFIED, sha256sum
from .registry import Entry, Manifest, ZooFileMissing, ZooHashMismatch

__all__ = ["HOME_ENV", "OFFLINE_ENV", "Verification", "export", "fetch", "home", "local_path", "verify"]

HOME_ENV = "MAMBA2D_HOME"
OFFLINE_ENV = "MAMBA2D_OFFLINE"


def home() -> Path:
    """Cache directory for downloaded checkpoints: $MAMBA2D_HOME, else the platform's user cache dir + /mamba2d."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mamba2d"


def local_path(entry: Entry, manifest: Manifest) -> Path:
    """Where the entry's file lives: beside the manifest for shipped weights, home()/checkpoints for downloads.

    Args:
        entry: The entry.
        manifest: The manifest it belongs to.
    """
    return manifest.root / entry.file if entry.file else home() / "checkpoints" / entry.filename


def _missing_message(entry: Entry, manifest: Manifest, path: Path, reason: str) -> str:
    if entry.url:
        how = (f"download {entry.url}\nand save it as {path}\n(e.g. `curl -L -o '{path}' '{entry.url}'`, then "
               f"`mamba2d zoo verify --names [{entry.name}]`). Set {HOME_ENV} to keep checkpoints elsewhere.")
    else:
        how = f"the file ships with its manifest in {manifest.root}; reinstall mamba2d to restore it."
    return f"zoo entry {entry.name!r}: {reason}. To fix it, {how}"


def _check_hash(entry: Entry, manifest: Manifest, path: Path) -> str:
    actual = sha256sum(path)
    if entry.sha256 and actual != entry.sha256:
        raise ZooHashMismatch(_missing_message(
            entry, manifest, path, f"sha256 of {path} is {actual} but the manifest says {entry.sha256}: the file is "
            "corrupt, incomplete or a different release; delete it"
        ))
    if not entry.sha256:
        warnings.warn(
            f"zoo entry {entry.name!r} is marked '{UNVERIFIED}'; the file at {path} has sha256 {actual}. Check it "
            "against the publisher and record it in the manifest.",
            stacklevel=3,
        )
    return actual


def fetch(entry: Entry, manifest: Manifest, force: bool = False, progress: bool | None = None) -> Path:
    """Make the entry's file present locally (downloading its URL if needed) and return its verified path.

    Downloads are refused when $MAMBA2D_OFFLINE is set; failing downloads raise ZooFileMissing saying what to
    download and where to put it.

    Args:
        entry: The entry.
        manifest: The manifest it belongs to.
        force: Download again even if the file is present.
        progress: Show a download progress bar on stderr (None: when stderr is a terminal).
    """
    path = local_path(entry, manifest)
    if path.exists() and not force:
        _check_hash(entry, manifest, path)
        return path
    if not entry.url:
        raise ZooFileMissing(_missing_message(entry, manifest, path, f"{path} does not exist"))
    if os.environ.get(OFFLINE_ENV):
        raise ZooFileMissing(_missing_message(entry, manifest, path, f"{path} is not cached and {OFFLINE_ENV} is set"))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    show_bar = sys.stderr.isatty() if progress is None else progress
    try:
        torch.hub.download_url_to_file(entry.url, str(partial), progress=show_bar)
    except Exception as exc:  # network errors come in many types (URLError, HTTPError, timeouts, SSL)
        partial.unlink(missing_ok=True)
        raise ZooFileMissing(_missing_message(entry, manifest, path, f"downloading failed ({exc})")) from exc
    partial.replace(path)
    _check_hash(entry, manifest, path)
    return path


@dataclass(frozen=True)
class Verification:
    """The local file of an entry against the manifest's sha256.

    Args:
        name: The entry.
        path: Where its file is (or would be).
        present: Whether the file exists.
        expected: The manifest's sha256 (None: not yet verified).
        actual: The file's sha256 (None when absent).
    """

    name: str
    path: Path
    present: bool
    expected: str | None
    actual: str | None

    @property
    def ok(self) -> bool:
        """Whether the file is present and has the manifest's sha256 (false for an entry without one)."""
        return self.present and self.expected is not None and self.expected == self.actual

    def describe(self) -> str:
        """One line for the zoo's verify command: the entry, OK / BAD HASH / UNVERIFIED / MISSING, hash and path."""
        if not self.present:
            return f"{self.name}: MISSING ({self.path})"
        if self.expected is None:
            return f"{self.name}: UNVERIFIED ({UNVERIFIED}); sha256 {self.actual} ({self.path})"
        return f"{self.name}: {'OK' if self.ok else 'BAD HASH'} sha256 {self.actual} ({self.path})"


def verify(entry: Entry, manifest: Manifest) -> Verification:
    """Hash the entry's local file and compare with the manifest (no download).

    Args:
        entry: The entry.
        manifest: The manifest it belongs to.
    """
    path = local_path(entry, manifest)
    actual = sha256sum(path) if path.exists() else None
    return Verification(entry.name, path, path.exists(), entry.sha256, actual)


def export(state_dict: Mapping[str, torch.Tensor], path: Path | str, metadata: Mapping[str, str] | None = None
           ) -> tuple[str, int]:
    """Write `state_dict` as safetensors (contiguous copies) and return (sha256, size in bytes) for the manifest.

    Args:
        state_dict: The weights.
        path: The file to write.
        metadata: String metadata stored in the file's header.
    """
    path = Path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, path, metadata=dict(metadata or {}))
    return sha256sum(path), path.stat().st_size
