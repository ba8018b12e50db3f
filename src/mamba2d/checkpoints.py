"""Reading checkpoint files safely and checking them: the floor that models and the zoo both stand on.

- `read_checkpoint`: safetensors as such; anything else through `torch.load(weights_only=True)`, with every
  non-tensor class a checkpoint names (a training config, numpy arrays, mmengine's message hub) replaced by an inert
  placeholder whose class is never imported. No checkpoint can run code.
- Known files: the zoo records the sha256 each of its files must have (`expect_sha256`); `read_checkpoint` checks a
  file of a recorded name before reading it, whichever route reads it (`mamba2d.zoo.load` or timm's
  `create_model(..., pretrained=True)`).
- `check_checkpoint_file`: a truncated, empty or foreign file is named as such before any loader reads it, so a
  user never meets a loader's internal error (or its advice to unpickle with `weights_only=False`).
- `check_state_dict`: a strict load's mismatches (missing, unexpected, wrongly shaped keys), all named at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import struct
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

__all__ = [
    "CheckpointError", "CheckpointHashMismatch", "CheckpointMismatch", "UNVERIFIED", "check_checkpoint_file",
    "check_state_dict",
    "expect_sha256", "expected_sha256", "listing", "mismatches", "read_checkpoint", "sha256sum", "verify_known_file",
]

logger = logging.getLogger(__name__)

UNVERIFIED = "sha256 not yet verified"

# File name -> the sha256 it must have, or None for a known file whose publisher gave no hash.
_EXPECTED: dict[str, str | None] = {}


class CheckpointError(RuntimeError):
    """A checkpoint file is unusable; the message names the file and says what to do."""


class CheckpointHashMismatch(CheckpointError):
    """A file's sha256 is not the one recorded for it."""


class CheckpointMismatch(CheckpointError):
    """Weights do not fit a model: missing, unexpected or wrongly shaped keys."""


def sha256sum(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks. A file unchanged since it was last hashed (same path, size and
    modification time) is not read again: a zoo load hashes when it fetches and again when the model reads it.

    Args:
        path: The file.

    Raises:
        FileNotFoundError: There is no file at `path`.
    """
    stat = Path(path).stat()
    return _sha256_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expect_sha256(filename: str, sha256: str | None) -> None:
    """Record the sha256 that every file named `filename` must have (None: known, but not yet verified).

    Args:
        filename: A file name (no directory): the zoo's file names are unique.
        sha256: Hex digest, or None.
    """
    _EXPECTED[filename] = sha256


def expected_sha256(filename: str) -> tuple[bool, str | None]:
    """The sha256 recorded for a file name by `expect_sha256`.

    Args:
        filename: A file name (no directory).

    Returns:
        (whether the name is recorded, its sha256 or None).
    """
    return filename in _EXPECTED, _EXPECTED.get(filename)


def verify_known_file(path: Path) -> None:
    """Check `path` against the sha256 recorded for its name: a warning (with the file's sha256) for a known file
    without a recorded hash, nothing for a file of another name.

    Args:
        path: The file.

    Raises:
        CheckpointHashMismatch: The file's sha256 differs from the one recorded for its name.
    """
    known, expected = expected_sha256(path.name)
    if not known:
        return
    actual = sha256sum(path)
    if expected is None:
        warnings.warn(f"{path}: {UNVERIFIED}; its sha256 is {actual}. Check it against the publisher and record it "
                      "in the zoo's manifest.", stacklevel=3)
    elif actual != expected:
        raise CheckpointHashMismatch(
            f"sha256 of {path} is {actual} but {expected} is recorded for {path.name}: the file is corrupt, "
            "incomplete or a different release; delete it and download it again")


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is corrupt or not a checkpoint: {why}. Save or download it again.")


def _check_safetensors(path: Path, size: int) -> None:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _corrupt(path, "shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise _corrupt(path, f"its safetensors header claims {length} bytes but the file has {size}")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _corrupt(path, "its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its safetensors header is not a JSON object")
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    if 8 + length + max(ends, default=0) > size:
        raise _corrupt(path, f"truncated: its tensors need {8 + length + max(ends)} bytes, the file has {size}")


def check_checkpoint_file(path: Path | str) -> None:
    """Raise CheckpointError naming `path` unless it looks like a whole checkpoint: a safetensors file whose header
    parses and whose tensors fit in the file, or a PyTorch zip archive whose members all pass their CRC check (a
    truncated download fails both). The pre-zip PyTorch format (a bare pickle) is accepted unchecked.

    Args:
        path: The file.

    Raises:
        CheckpointError: `path` is missing, empty, truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise _corrupt(path, "the file is empty")
    if path.suffix == ".safetensors":
        _check_safetensors(path, size)
        return
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise _corrupt(path, f"its zip archive is damaged ({exc})") from None
        if bad is not None:
            raise _corrupt(path, f"member {bad} of its zip archive fails its CRC check")
        return
    with open(path, "rb") as fh:
        legacy = fh.read(1) == pickle.PROTO
    if not legacy:
        raise _corrupt(path, "neither a PyTorch archive (zip; a truncated one loses its directory) nor safetensors")


class _Inert(dict):
    """Stand-in for every non-tensor class a checkpoint names: records its arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        self.state = state


def read_checkpoint(path: Path | str, verify: bool = True) -> dict[str, Any]:
    """Read a safetensors file, or a torch checkpoint with `weights_only=True`, after checking a known file's sha256.

    Globals that the weights-only unpickler does not allow (config classes, numpy arrays, ...) are mapped to an inert
    placeholder instead of being imported, so checkpoints with training metadata still yield their tensors.

    Args:
        path: The file.
        verify: Check the sha256 recorded for the file's name (see `expect_sha256`); off only for a caller that
            hashes and reports the file itself.

    Returns:
        The checkpoint's top-level dict (for safetensors, the tensors by name).

    Raises:
        CheckpointError: The file is missing, corrupt or not a dict checkpoint.
        CheckpointHashMismatch: Its sha256 is not the one recorded for its name.
    """
    path = Path(path)
    check_checkpoint_file(path)
    if verify:
        verify_known_file(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if unsafe:
            logger.info("%s: non-tensor objects %s are read as inert placeholders", path, ", ".join(unsafe))
        with torch.serialization.safe_globals([(_Inert, name) for name in unsafe]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, KeyError, EOFError, OSError, pickle.UnpicklingError) as exc:
        # The loaders' own messages may advise unpickling with weights_only=False: not for a file we cannot read.
        raise _corrupt(path, f"{type(exc).__name__} while reading it") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    return checkpoint


def mismatches(model: nn.Module, state_dict: Mapping[str, torch.Tensor], missing_ok: Iterable[str] = ()
               ) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, shape mismatches) of `state_dict` against `model`.

    Args:
        model: The model to load into.
        state_dict: The weights.
        missing_ok: Model keys the weights may lack.
    """
    expected = model.state_dict()
    missing_ok = set(missing_ok)
    missing = [k for k in expected if k not in state_dict and k not in missing_ok]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, shapes


def listing(what: str, items: list[str], limit: int = 12) -> str:
    """'N what: a, b, c ...' with at most `limit` items shown, for messages about many keys.

    Args:
        what: What the items are (e.g. 'missing keys').
        items: The items.
        limit: Items shown before ' ...'.
    """
    return f"{len(items)} {what}: {', '.join(items[:limit])}{' ...' if len(items) > limit else ''}"


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, missing_ok: Iterable[str] = ()
) -> None:
    """Raise CheckpointMismatch naming every missing, unexpected and wrongly shaped key (no partial loads).

    Args:
        model: The model to load into.
        state_dict: The weights.
        source: What the weights are, for the message (a file, a zoo entry).
        missing_ok: Model keys the weights may lack.

    Raises:
        CheckpointMismatch: Some key is missing, unexpected or wrongly shaped.
    """
    found = zip(("missing keys", "unexpected keys", "shape mismatches"), mismatches(model, state_dict, missing_ok))
    problems = [listing(what, items) for what, items in found if items]
    if problems:
        raise CheckpointMismatch(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
