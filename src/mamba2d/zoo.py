"""Model zoo: a manifest of checkpoints, sha256-verified files, safe reading and converters from VMamba's layouts.

The manifest is `zoo/manifest.yaml` in the repository (package `mamba2d._zoo` once installed). Small weights
trained here ship beside it; larger ones (VMamba's releases) are downloaded into `home()/checkpoints`, where
`home()` is `$MAMBA2D_HOME` or the user cache directory. Every file is checked against the manifest's sha256 before
it is read, safetensors files are read as such, and any other file goes through `torch.load(weights_only=True)`:
no checkpoint can run code. Objects other than tensors inside a checkpoint (a training config, numpy arrays,
mmengine's message hub) are replaced by inert placeholders, their classes never imported.

    import mamba2d.zoo as zoo
    zoo.list()                               # entry names, `arch.tag`
    model = zoo.load("vmamba2d_nano.digits") # model with verified weights, strict key check
    timm.create_model("vmamba2d_nano", pretrained=True)   # the same, through timm (first entry of that arch)

Layouts the converters read:
- `vmamba-classification`: VMamba's classification checkpoint, a dict whose key `model` holds the state dict with
  the names our VSSM uses (VMamba v2: patch_embed.0/2/5/7, layers.i.blocks.j.*, layers.i.downsample.1/3,
  classifier.norm/head).
- `mmengine-dense`: an mmengine (mmseg / mmdet) checkpoint, `state_dict` holding `backbone.*` (the VSSM with its
  per-stage norms outnorm0..3 and no classifier) and the heads (`decode_head.*`, `neck.*`, ...). The backbone part
  is converted; the head tensors are returned separately and reported, not silently dropped.
- `mamba2d`: a state dict of our model as is (what `export` writes).
"""

from __future__ import annotations

import argparse
import builtins
import fnmatch
import hashlib
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file, save_file

from .resources import resource_dir

__all__ = [
    "CheckpointMismatch", "Entry", "FileCheck", "ZooError", "ZooFileMissing", "ZooHashMismatch", "check_file",
    "check_state_dict", "convert_mmengine_dense", "convert_vmamba_classification", "detect_layout", "export", "fetch",
    "get", "home", "infer_backbone_arch", "list", "load", "load_into", "load_state_dict", "load_weights",
    "read_checkpoint", "read_model_weights", "verify",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("mamba2d", "vmamba-classification", "mmengine-dense")
PROVENANCES = ("official", "converted", "trained here")
TASKS = ("classification", "segmentation", "detection", "mil")
UNVERIFIED = "sha256 not yet verified"
HOME_ENV = "MAMBA2D_HOME"
OFFLINE_ENV = "MAMBA2D_OFFLINE"
REQUIRED_FIELDS = ("name", "arch", "task", "layout", "license", "provenance")


class ZooError(RuntimeError):
    """A zoo entry, file or checkpoint is unusable; the message says which and what to do."""


class ZooFileMissing(ZooError):
    pass


class ZooHashMismatch(ZooError):
    pass


class CheckpointMismatch(ZooError):
    pass


@dataclass(frozen=True)
class Entry:
    """One checkpoint of the manifest. `name` is `arch.tag`; `file` is relative to the zoo directory."""

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
        return self.name.split(".", 1)[1]

    @property
    def verified(self) -> bool:
        return bool(self.sha256)

    @property
    def filename(self) -> str:
        return self.file or self.url.rstrip("/").rsplit("/", 1)[-1]


def zoo_dir() -> Path:
    """The directory holding manifest.yaml and the small weights (editable install or wheel alike)."""
    return resource_dir("mamba2d._zoo", "zoo", "manifest.yaml")


def manifest_path() -> Path:
    return zoo_dir() / "manifest.yaml"


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


def _entries() -> dict[str, Entry]:
    return _read_manifest(manifest_path())


@cache
def _read_manifest(path: Path) -> dict[str, Entry]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("entries"), builtins.list):
        raise ZooError(f"{path}: expected a mapping with a list under 'entries'")
    entries: dict[str, Entry] = {}
    for raw in data["entries"]:
        entry = _parse_entry(raw, path)
        if entry.name in entries:
            raise ZooError(f"{path}: entry {entry.name!r} is listed twice")
        entries[entry.name] = entry
    return entries


def list(pattern: str = "*") -> list[str]:  # noqa: A001  (the zoo's public verb, as timm.list_models)
    """Names of the zoo entries matching the shell-style `pattern`, in manifest order."""
    return [name for name in _entries() if fnmatch.fnmatchcase(name, pattern)]


def is_entry(name: str) -> bool:
    return name in _entries()


def get(name: str) -> Entry:
    try:
        return _entries()[name]
    except KeyError:
        raise ZooError(f"no zoo entry {name!r}; known entries: {', '.join(_entries())}") from None


def default_entry(arch: str) -> Entry:
    """The first manifest entry for `arch`: what `timm.create_model(arch, pretrained=True)` loads."""
    for entry in _entries().values():
        if entry.arch == arch:
            return entry
    raise ZooError(
        f"the mamba2d zoo has no weights for {arch!r}; entries: {', '.join(_entries())}. Pass "
        "pretrained_cfg_overlay=dict(file=...) to timm.create_model for a checkpoint of your own"
    )


def local_path(entry: Entry) -> Path:
    """Where the entry's file lives: the zoo directory for shipped weights, home()/checkpoints for downloads."""
    return zoo_dir() / entry.file if entry.file else home() / "checkpoints" / entry.filename


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_message(entry: Entry, path: Path, reason: str) -> str:
    if entry.url:
        how = (f"download {entry.url}\nand save it as {path}\n(e.g. `curl -L -o '{path}' '{entry.url}'`, then "
               f"`mamba2d-zoo verify {entry.name}`). Set {HOME_ENV} to keep checkpoints elsewhere.")
    else:
        how = f"the file ships with mamba2d in {zoo_dir()}; reinstall mamba2d to restore it."
    return f"zoo entry {entry.name!r}: {reason}. To fix it, {how}"


def _check_hash(entry: Entry, path: Path) -> str:
    actual = sha256sum(path)
    if entry.sha256 and actual != entry.sha256:
        raise ZooHashMismatch(_missing_message(
            entry, path, f"sha256 of {path} is {actual} but the manifest says {entry.sha256}: the file is corrupt, "
            "incomplete or a different release; delete it"
        ))
    if not entry.sha256:
        warnings.warn(
            f"zoo entry {entry.name!r} is marked '{UNVERIFIED}'; the file at {path} has sha256 {actual}. Check it "
            "against the publisher and record it in zoo/manifest.yaml.",
            stacklevel=3,
        )
    return actual


def fetch(name: str, force: bool = False) -> Path:
    """Make the entry's file present locally (downloading its URL if needed) and return its verified path.

    Downloads are refused when $MAMBA2D_OFFLINE is set; failing downloads raise ZooFileMissing saying what to
    download and where to put it.
    """
    entry = get(name)
    path = local_path(entry)
    if path.exists() and not force:
        _check_hash(entry, path)
        return path
    if not entry.url:
        raise ZooFileMissing(_missing_message(entry, path, f"{path} does not exist"))
    if os.environ.get(OFFLINE_ENV):
        raise ZooFileMissing(_missing_message(entry, path, f"{path} is not cached and {OFFLINE_ENV} is set"))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    try:
        torch.hub.download_url_to_file(entry.url, str(partial), progress=sys.stderr.isatty())
    except Exception as exc:  # network errors come in many types (URLError, HTTPError, timeouts, SSL)
        partial.unlink(missing_ok=True)
        raise ZooFileMissing(_missing_message(entry, path, f"downloading failed ({exc})")) from exc
    partial.replace(path)
    _check_hash(entry, path)
    return path


@dataclass(frozen=True)
class Verification:
    name: str
    path: Path
    present: bool
    expected: str | None
    actual: str | None

    @property
    def ok(self) -> bool:
        return self.present and self.expected is not None and self.expected == self.actual

    def describe(self) -> str:
        if not self.present:
            return f"{self.name}: MISSING ({self.path})"
        if self.expected is None:
            return f"{self.name}: UNVERIFIED ({UNVERIFIED}); sha256 {self.actual} ({self.path})"
        return f"{self.name}: {'OK' if self.ok else 'BAD HASH'} sha256 {self.actual} ({self.path})"


def verify(name: str) -> Verification:
    """Compare the local file of entry `name` with the manifest's sha256 (no download)."""
    entry = get(name)
    path = local_path(entry)
    actual = sha256sum(path) if path.exists() else None
    return Verification(name, path, path.exists(), entry.sha256, actual)


class _Inert(dict):
    """Stand-in for every non-tensor class a checkpoint names: records its arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        self.state = state


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a safetensors file, or a torch checkpoint with `weights_only=True`.

    Globals that the weights-only unpickler does not allow (config classes, numpy arrays, ...) are mapped to an inert
    placeholder instead of being imported, so checkpoints with training metadata still yield their tensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    if unsafe:
        logger.info("%s: non-tensor objects %s are read as inert placeholders", path, ", ".join(unsafe))
    with torch.serialization.safe_globals([(_Inert, name) for name in unsafe]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ZooError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    return checkpoint


def _tensor_dict(mapping: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    bad = [k for k, v in mapping.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ZooError(f"{where}: entries {bad[:5]} are not tensors; this is not a state dict")
    return dict(mapping)


def convert_vmamba_classification(checkpoint: Mapping[str, Any], key: str = "model") -> dict[str, torch.Tensor]:
    """VMamba classification checkpoint ({'model': state_dict, ...}) -> our VSSM state dict (names are shared)."""
    if key not in checkpoint:
        raise ZooError(
            f"VMamba classification checkpoint: no key {key!r}; it has {sorted(checkpoint)}. Pass key= one of them "
            "(e.g. 'model_ema' for EMA weights)"
        )
    return _tensor_dict(checkpoint[key], f"VMamba classification checkpoint[{key!r}]")


def convert_mmengine_dense(
    checkpoint: Mapping[str, Any], prefix: str = "backbone."
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """mmengine checkpoint ({'meta': ..., 'state_dict': {...}}) -> (backbone state dict, the other tensors).

    The backbone keys lose `prefix` and keep VMamba's names, outnorm0..3 included. Head and neck tensors are returned
    as the second dict for the caller to load into its heads or report.
    """
    if "state_dict" not in checkpoint:
        raise ZooError(f"mmengine checkpoint: no key 'state_dict'; it has {sorted(checkpoint)}")
    state = _tensor_dict(checkpoint["state_dict"], "mmengine checkpoint['state_dict']")
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not backbone:
        raise ZooError(f"mmengine checkpoint: no key starts with {prefix!r}; first keys: {[*state][:5]}")
    others = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return backbone, others


def convert(entry: Entry, checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Backbone/model state dict of `entry` from its raw checkpoint, by the entry's layout."""
    if entry.layout == "vmamba-classification":
        return convert_vmamba_classification(checkpoint)
    if entry.layout == "mmengine-dense":
        backbone, others = convert_mmengine_dense(checkpoint)
        if others:
            groups = sorted({k.split(".", 1)[0] for k in others})
            logger.warning(
                "%s: %d head tensors (%s) are not part of the backbone and are not loaded by the zoo",
                entry.name, len(others), ", ".join(groups),
            )
        return backbone
    return _tensor_dict(checkpoint, entry.name)


def detect_layout(checkpoint: Mapping[str, Any], source: str) -> str:
    """The layout of a checkpoint read by `read_checkpoint`, from its keys; ZooError naming the file and its
    top-level keys for a layout the zoo does not know.

    `vmamba-classification`: a mapping under `model`. `mmengine-dense`: `state_dict` with `backbone.*` keys.
    `lightning`: `state_dict` with `model.*` keys (a mamba2d task's checkpoint). `mamba2d`: a plain state dict.
    """
    if isinstance(checkpoint.get("model"), Mapping):
        return "vmamba-classification"
    state = checkpoint.get("state_dict")
    if isinstance(state, Mapping):
        for prefix, layout in (("backbone.", "mmengine-dense"), ("model.", "lightning")):
            if any(str(k).startswith(prefix) for k in state):
                return layout
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return "mamba2d"
    keys = sorted(map(str, checkpoint))
    raise ZooError(
        f"{source}: unknown checkpoint layout (top-level keys: {keys[:10]}{' ...' if len(keys) > 10 else ''}). "
        "Known: a VMamba classification checkpoint ({'model': state_dict}), an mmengine dense checkpoint "
        "({'state_dict': {'backbone.*', ...}}), a mamba2d Lightning checkpoint ({'state_dict': {'model.*', ...}}) "
        "or a plain state dict of tensors"
    )


def _split_weights(checkpoint: Mapping[str, Any], layout: str, source: str
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model weights, other tensors that are not the model's) of a checkpoint in `layout`."""
    if layout == "vmamba-classification":
        return convert_vmamba_classification(checkpoint), {}
    if layout in ("mmengine-dense", "lightning"):
        return convert_mmengine_dense(checkpoint, prefix="backbone." if layout == "mmengine-dense" else "model.")
    return _tensor_dict(checkpoint, source), {}


def read_model_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """Our model's state dict from a checkpoint in any layout the zoo knows, detected from its keys.

    Plain state dict or safetensors (`mamba2d`); VMamba classification (`model`); mmengine dense (`state_dict` with
    `backbone.*`, heads reported); a Lightning checkpoint of a mamba2d task (`state_dict` with `model.*`, the
    task's other tensors such as EMA copies reported).

    Args:
        path: The checkpoint file.
    """
    checkpoint = read_checkpoint(path)
    weights, others = _split_weights(checkpoint, detect_layout(checkpoint, str(path)), str(path))
    if others:
        logger.warning("%s: %d tensors that are not model weights (%s) are not loaded", path, len(others),
                       ", ".join(sorted({k.split(".", 1)[0] for k in others})))
    return weights


def load_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Fetch (if needed), verify and convert the weights of entry `name` into our model's state dict."""
    entry = get(name)
    return convert(entry, read_checkpoint(fetch(name)))


def _mismatches(model: nn.Module, state_dict: Mapping[str, torch.Tensor], missing_ok: Iterable[str] = ()
                ) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, shape mismatches) of `state_dict` against `model`."""
    expected = model.state_dict()
    missing_ok = set(missing_ok)
    missing = [k for k in expected if k not in state_dict and k not in missing_ok]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, shapes


def _listing(what: str, items: list[str], limit: int = 12) -> str:
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
    """
    found = zip(("missing keys", "unexpected keys", "shape mismatches"), _mismatches(model, state_dict, missing_ok))
    problems = [_listing(what, items) for what, items in found if items]
    if problems:
        raise CheckpointMismatch(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
              missing_ok: Iterable[str] = ()) -> nn.Module:
    """Strictly load `state_dict` into `model` (or into the backbone of a timm features_only wrapper)."""
    target = model.model if hasattr(model, "feature_info") and isinstance(getattr(model, "model", None), nn.Module) \
        else model
    missing_ok = tuple(missing_ok)
    check_state_dict(target, state_dict, source, missing_ok)
    target.load_state_dict(state_dict, strict=not missing_ok)
    return model


def load_weights(model: nn.Module, source: str) -> nn.Module:
    """Strictly load into `model` the weights of `source`: a zoo entry name, else a checkpoint file in any layout
    `read_model_weights` knows. Fails loudly (CheckpointMismatch, ZooError) and never half-loads."""
    if is_entry(source):
        return load_into(model, load_state_dict(source), f"zoo entry {source!r}", get(source).missing_ok)
    if not Path(source).is_file():
        raise ZooError(f"weights {source!r} is neither a zoo entry (mamba2d-zoo list) nor an existing file")
    return load_into(model, read_model_weights(source), source)


def load(name: str, arch: str | None = None, **kwargs) -> nn.Module:
    """Model of entry `name` with its verified weights, loaded strictly.

    `kwargs` override the entry's model kwargs (e.g. features_only=True). `arch` builds another architecture with the
    same parameter layout (e.g. a VMamba checkpoint into `vmamba2d_tiny`); its metrics then no longer apply.
    """
    import timm

    from . import models  # noqa: F401  (registers the backbones with timm)

    entry = get(name)
    if entry.task == "mil":  # MIL models are built by name, not through timm
        from .models.mil import create_mil_model

        model = create_mil_model(arch or entry.arch, **{**entry.kwargs, **kwargs})
    else:
        model = timm.create_model(arch or entry.arch, **{**entry.kwargs, **kwargs})
    return load_weights(model, name).eval()


def _entry_for_file(path: Path, sha256: str) -> Entry | None:
    """The manifest entry whose sha256 (else file name) is this file's."""
    entries = _entries().values()
    return next((e for e in entries if e.sha256 == sha256), None) or next(
        (e for e in entries if e.filename == path.name), None)


def infer_backbone_arch(state_dict: Mapping[str, torch.Tensor], source: str) -> str:
    """`vmamba_<size>` whose dims, depths and SS2D width a VSSM state dict has (the scan, 1D or 2D, leaves no trace
    in the weights: the same file loads into `vmamba2d_<size>`)."""
    from .models.vmamba import MODEL_SIZES

    if "patch_embed.5.weight" not in state_dict:
        raise ZooError(f"{source}: not a VMamba / 2DVMamba backbone (no patch_embed.5.weight); pass the arch")
    depths = []
    while any(k.startswith(f"layers.{len(depths)}.blocks.") for k in state_dict):
        i = len(depths)
        depths.append(len({k.split(".")[3] for k in state_dict if k.startswith(f"layers.{i}.blocks.")}))
    dim = state_dict["patch_embed.5.weight"].shape[0]
    inner = state_dict["layers.0.blocks.0.op.in_proj.weight"].shape[0] if depths else 0
    for size, cfg in MODEL_SIZES.items():
        if (cfg["dims"], tuple(cfg["depths"]), cfg["ssm_ratio"]) == (dim, tuple(depths), inner / dim):
            return f"vmamba_{size}"
    raise ZooError(f"{source}: a VSSM with dims[0]={dim}, depths={tuple(depths)}, SS2D width {inner} matches no "
                   f"registered size ({', '.join(MODEL_SIZES)}); pass the arch")


@dataclass(frozen=True)
class FileCheck:
    """What `check_file` found: the file's identity, how it loads and what to compare its model with."""

    path: Path
    sha256: str
    layout: str
    arch: str
    entry: Entry | None
    missing: list[str]
    unexpected: list[str]
    shapes: list[str]
    not_loaded: list[str]
    norm_eps: list[float]

    @property
    def hash_ok(self) -> bool:
        return self.entry is None or not self.entry.sha256 or self.entry.sha256 == self.sha256

    @property
    def ok(self) -> bool:
        return self.hash_ok and not (self.missing or self.unexpected or self.shapes)

    def describe(self) -> str:
        entry = self.entry
        if entry is None:
            identity = "not in the zoo's manifest"
        elif not entry.sha256:
            identity = f"file of zoo entry {entry.name} ({UNVERIFIED}: confirm this hash with the publisher)"
        else:
            identity = f"zoo entry {entry.name}: " + ("matches the manifest" if self.hash_ok else
                                                      f"DIFFERS from the manifest's {entry.sha256}")
        loads = [_listing(what, items) for what, items in (
            ("missing keys", self.missing), ("unexpected keys", self.unexpected), ("shape mismatches", self.shapes))
            if items]
        metrics = {k: v for k, v in entry.metrics.items() if k != "data"} if entry else {}
        compare = (f"{', '.join(f'{k} {v}' for k, v in metrics.items())} on {entry.metrics.get('data', '?')}"
                   if metrics else "nothing published in the manifest")
        lines = [
            f"file        {self.path}",
            f"sha256      {self.sha256} ({identity})",
            f"layout      {self.layout}",
            f"model       {self.arch}",
            "strict load " + ("OK: every key and shape matches" if not loads else "FAILED: " + "; ".join(loads)),
        ]
        if self.not_loaded:
            lines.append(f"not loaded  {_listing('tensors outside the model (heads, EMA copies, ...)', self.not_loaded, 6)}")
        lines += [
            f"norm eps    {', '.join(f'{e:g}' for e in self.norm_eps) or 'no normalisation layers'}",
            f"compare     {compare}",
            f"result      {'OK' if self.ok else 'FAILED'}",
        ]
        return "\n".join(lines)


def check_file(path: Path | str, arch: str | None = None) -> FileCheck:
    """Converter self-check of a checkpoint file, e.g. an official one just downloaded.

    Detects the layout (ZooError on one the zoo does not know), converts it, builds the model (the zoo entry's arch
    and kwargs when the file is an entry's, else `arch`, else the VMamba size its shapes give) and loads it
    strictly, and reports the sha256 against the manifest, every missing / unexpected / wrongly shaped key, the
    tensors left out, the eps of the model's norms and the published metrics to compare an evaluation with.

    Args:
        path: The checkpoint file (safetensors or a torch checkpoint, read without unpickling code).
        arch: The architecture to load into; overrides the manifest's (e.g. `vmamba2d_tiny` for a VMamba file).
    """
    import timm

    from . import models  # noqa: F401  (registers the backbones with timm)
    from .models.mil import MIL_MODELS, create_mil_model

    path = Path(path)
    if not path.is_file():
        raise ZooError(f"{path}: no such file")
    sha256 = sha256sum(path)
    entry = _entry_for_file(path, sha256)
    checkpoint = read_checkpoint(path)
    layout = detect_layout(checkpoint, str(path))
    state, others = _split_weights(checkpoint, layout, str(path))
    dense = any(k.startswith("outnorm") for k in state)
    arch = arch or (entry.arch if entry else infer_backbone_arch(state, str(path)))
    kwargs = dict(entry.kwargs) if entry else {}
    missing_ok = entry.missing_ok if entry else ()
    if arch in MIL_MODELS:
        if not entry:
            raise ZooError(f"{path}: a MIL model's kwargs are not in the file; check it as a zoo entry")
        model = create_mil_model(arch, **kwargs)
    else:
        if not entry:
            head = state.get("classifier.head.weight")
            kwargs = {"features_only": True} if dense else {"num_classes": head.shape[0] if head is not None else 0}
            missing_ok = ("classifier.norm.weight", "classifier.norm.bias") if dense else ()
        model = timm.create_model(arch, **kwargs)
    target = model.model if kwargs.get("features_only") else model
    missing, unexpected, shapes = _mismatches(target, state, missing_ok)
    if not (missing or unexpected or shapes):
        target.load_state_dict(state, strict=not missing_ok)
    norm_eps = sorted({float(m.eps) for m in model.modules() if isinstance(getattr(m, "eps", None), float)})
    return FileCheck(path, sha256, layout, arch, entry, missing, unexpected, shapes, sorted(others), norm_eps)


def timm_pretrained_cfg(variant: str, requested: Any = None, overlay: Mapping[str, Any] | None = None) -> Any:
    """Pretrained cfg for `timm.create_model(variant[.tag], pretrained=True)` holding the zoo's verified weights.

    Called by the backbone builders. A cfg dict or PretrainedCfg passed by the caller, or an overlay naming its own
    weights (file, url, state_dict, hf_hub_id), bypasses the zoo: `requested` is returned unchanged.
    """
    own_source = any((overlay or {}).get(k) for k in ("file", "url", "state_dict", "hf_hub_id"))
    if own_source or (requested is not None and not isinstance(requested, str)):
        return requested
    import timm

    entry = get(f"{variant}.{requested}") if requested else default_entry(variant)
    base = timm.models.get_pretrained_cfg(variant)
    cfg = base.to_dict() if base is not None else {}
    cfg.update(
        architecture=variant, tag=entry.tag, source=f"mamba2d zoo {entry.name}", license=entry.license,
        num_classes=entry.kwargs.get("num_classes", 1000), state_dict=load_state_dict(entry.name),
    )
    size = entry.input.get("size")
    if size:
        cfg["input_size"] = (entry.kwargs.get("in_chans", 3), size, size)
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if key in entry.input:
            cfg[key] = tuple(entry.input[key]) if isinstance(entry.input[key], (tuple, builtins.list)) else entry.input[key]
    return cfg


def export(state_dict: Mapping[str, torch.Tensor], path: Path | str, metadata: Mapping[str, str] | None = None
           ) -> tuple[str, int]:
    """Write `state_dict` as safetensors (contiguous copies) and return (sha256, size in bytes) for the manifest."""
    path = Path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, path, metadata=dict(metadata or {}))
    return sha256sum(path), path.stat().st_size


def _info(entry: Entry) -> str:
    lines = [f"{entry.name}"]
    for key in ("arch", "task", "provenance", "license", "layout", "kwargs", "file", "url", "sha256", "size",
                "status", "metrics", "input", "recipe", "notes"):
        value = getattr(entry, key)
        if value not in (None, {}, ()):
            lines.append(f"  {key:<10} {value}")
    lines.append(f"  {'local':<10} {local_path(entry)}{'' if local_path(entry).exists() else ' (not present)'}")
    return "\n".join(lines)


def _metric_summary(entry: Entry) -> str:
    return ", ".join(f"{k}={v}" for k, v in entry.metrics.items() if isinstance(v, (int, float)))


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mamba2d-zoo", description="The mamba2d model zoo: list, inspect, "
                                     f"download and verify checkpoints (cache: ${HOME_ENV}, now {home()}).")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list entries")
    p_list.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'vmamba2d_*'")
    for command, text in (("info", "show an entry"), ("fetch", "download an entry into the cache and verify it")):
        sub.add_parser(command, help=text).add_argument("names", nargs="+", help="entry names")
    p_verify = sub.add_parser(
        "verify", help="check local files: sha256 against the manifest, then the converter self-check (strict load, "
        "norm eps, the published metrics to compare with)")
    p_verify.add_argument("names", nargs="*", help="entry names (default: every entry whose file is present)")
    p_verify.add_argument("--file", type=Path, help="a checkpoint file to check instead, e.g. a downloaded official one")
    p_verify.add_argument("--arch", help="architecture to load the file into (default: the entry's, else inferred)")
    args = parser.parse_args(None if argv is None else [*argv])

    if args.command == "list":
        rows = [(e.name, e.task, e.provenance, "sha256 ok" if e.verified else "unverified", _metric_summary(e))
                for e in map(get, list(args.pattern))]
        widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
        return 0
    if args.command == "info":
        print("\n\n".join(_info(get(n)) for n in args.names))
        return 0
    if args.command == "fetch":
        for n in args.names:
            print(f"{n}: {fetch(n)}")
        return 0
    return _verify_command(args.names, args.file, args.arch)


def _verify_command(names: Iterable[str], file: Path | None, arch: str | None) -> int:
    """`mamba2d-zoo verify`: 0 when every check passes, 1 when one fails, 2 on a file the zoo cannot read."""
    try:
        if file is not None:
            result = check_file(file, arch)
            print(result.describe())
            return 0 if result.ok else 1
        ok = True
        for name in names or [n for n in list() if local_path(get(n)).exists()]:
            hashed = verify(name)
            if not hashed.present or (hashed.expected and not hashed.ok):
                print(hashed.describe())
                ok = False
                continue
            result = check_file(hashed.path, arch)
            print(f"{name}\n{result.describe()}\n")
            ok = ok and result.ok
        return 0 if ok else 1
    except ZooError as exc:
        print(f"mamba2d-zoo verify: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
