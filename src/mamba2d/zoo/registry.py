"""The zoo's manifest: entries, their validation and lookup.

The shipped manifest is `zoo/manifest.yaml` in the repository (package `mamba2d._zoo` once installed); a lab can
keep its own manifest in the same format and pass it as `Manifest.read(path)` to the zoo's functions. An entry's
`file` is relative to its manifest's folder.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from ..checkpoints import UNVERIFIED, CheckpointError
from ..resources import resource_dir

__all__ = ["Entry", "LAYOUTS", "Manifest", "PROVENANCES", "TASKS", "ZooError", "ZooFileMissing", "ZooHashMismatch",
           "shipped_manifest", "zoo_dir"]

LAYOUTS = ("mamba2d", "vmamba-classification", "mmengine-dense")
PROVENANCES = ("official", "converted", "trained here")
TASKS = ("classification", "segmentation", "detection", "mil")
REQUIRED_FIELDS = ("name", "arch", "task", "layout", "license", "provenance")


class ZooError(CheckpointError):
    """A zoo entry, file or checkpoint is unusable; the message says which and what to do."""


class ZooFileMissing(ZooError):
    """An entry's file is not on this machine and could not be downloaded."""


class ZooHashMismatch(ZooError):
    """An entry's file does not have the manifest's sha256."""


@dataclass(frozen=True)
class Entry:
    """One checkpoint of the manifest.

    Args:
        name: `arch.tag`.
        arch: The model's registered name (timm, or a MIL model of `mamba2d.models.mil`).
        task: One of TASKS.
        layout: How the file stores the weights, one of LAYOUTS.
        license: The weights' licence.
        provenance: One of PROVENANCES.
        kwargs: Model arguments the weights need (num_classes, features_only, ...).
        file: File name in the manifest's folder (weights shipped with it).
        url: Where to download the file (into the cache, `files.home()`).
        sha256: The file's hex sha256; None only with `status: sha256 not yet verified`.
        size: The file's size in bytes.
        status: `sha256 not yet verified` for files whose publisher gives no hash.
        metrics: Published or measured metrics, with `data` saying on what.
        input: Preprocessing: size, mean, std, interpolation, crop_pct.
        missing_ok: Model keys the file may lack.
        recipe: How the weights were made.
        notes: Anything else a user should know.
    """

    name: str
    arch: str
    task: str
    layout: str
    license: str
    provenance: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    file: str | None = None
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    status: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    input: dict[str, Any] = field(default_factory=dict)
    missing_ok: tuple[str, ...] = ()
    recipe: str | None = None
    notes: str | None = None

    @property
    def tag(self) -> str:
        """The part of the name after the arch: timm's pretrained tag."""
        return self.name.split(".", 1)[1]

    @property
    def verified(self) -> bool:
        """Whether the manifest holds a sha256 for the file (not whether a local file was hashed)."""
        return bool(self.sha256)

    @property
    def filename(self) -> str:
        """The file's name: `file`, else the last component of `url`."""
        return self.file or self.url.rstrip("/").rsplit("/", 1)[-1]


def _parse_entry(raw: Mapping[str, Any], source: Path) -> Entry:
    where = f"{source}: entry {raw.get('name', '<no name>')!r}"
    missing = [k for k in REQUIRED_FIELDS if not raw.get(k)]
    if missing:
        raise ZooError(f"{where} lacks required field(s) {', '.join(missing)}")
    unknown = set(raw) - set(Entry.__dataclass_fields__)
    if unknown:
        raise ZooError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}")
    if "." not in raw["name"] or not raw["name"].startswith(raw["arch"] + "."):
        raise ZooError(f"{where}: name must be '<arch>.<tag>' with arch {raw['arch']!r}")
    for key, allowed in (("layout", LAYOUTS), ("provenance", PROVENANCES), ("task", TASKS)):
        if raw[key] not in allowed:
            raise ZooError(f"{where}: {key} {raw[key]!r} is not one of {', '.join(allowed)}")
    if not raw.get("file") and not raw.get("url"):
        raise ZooError(f"{where} needs a 'file' (in the zoo directory) or a 'url'")
    if not raw.get("sha256") and raw.get("status") != UNVERIFIED:
        raise ZooError(f"{where} has no sha256; give one or mark it status: '{UNVERIFIED}'")
    return Entry(**{**raw, "missing_ok": tuple(raw.get("missing_ok") or ())})


@dataclass(frozen=True)
class Manifest:
    """A manifest file's entries, in file order.

    Args:
        path: The manifest file.
        entries: Entry by name.
    """

    path: Path
    entries: dict[str, Entry]

    @classmethod
    def read(cls, path: Path | str) -> Manifest:
        """Parse and validate a manifest file (ZooError naming the file and the entry at fault).

        Args:
            path: A YAML file with a list of entries under `entries`.

        Raises:
            ZooError: The file is not such a list, or an entry is invalid or listed twice.
        """
        path = Path(path)
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise ZooError(f"{path}: expected a mapping with a list under 'entries'")
        entries: dict[str, Entry] = {}
        for raw in data["entries"]:
            entry = _parse_entry(raw, path)
            if entry.name in entries:
                raise ZooError(f"{path}: entry {entry.name!r} is listed twice")
            entries[entry.name] = entry
        return cls(path, entries)

    @property
    def root(self) -> Path:
        """The folder that entries' `file` names are relative to."""
        return self.path.parent

    def names(self, pattern: str = "*") -> list[str]:
        """Entry names matching the shell-style `pattern`, in manifest order.

        Args:
            pattern: e.g. 'vmamba2d_*' (case-sensitive).
        """
        return [name for name in self.entries if fnmatch.fnmatchcase(name, pattern)]

    def get(self, name: str) -> Entry:
        """The entry `name`.

        Args:
            name: `arch.tag`.

        Raises:
            ZooError: No entry has that name (the message lists the known ones).
        """
        try:
            return self.entries[name]
        except KeyError:
            raise ZooError(f"no zoo entry {name!r}; known entries: {', '.join(self.entries)}") from None

    def for_file(self, path: Path, sha256: str) -> Entry | None:
        """The entry whose sha256 is this file's, else the entry whose file name it has; None if neither.

        Args:
            path: The file.
            sha256: Its hex sha256.
        """
        return next((e for e in self.entries.values() if e.sha256 == sha256), None) or next(
            (e for e in self.entries.values() if e.filename == path.name), None)


def zoo_dir() -> Path:
    """The folder of the shipped manifest and the small weights (editable install or wheel alike)."""
    return resource_dir("mamba2d._zoo", "zoo", "manifest.yaml")


@cache
def shipped_manifest() -> Manifest:
    """The manifest that ships with mamba2d (read once)."""
    return Manifest.read(zoo_dir() / "manifest.yaml")
