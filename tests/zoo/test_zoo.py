"""Zoo registry, safe checkpoint reading, sha256 checks and the converters from VMamba's official layouts.

The "official layout" fixtures are written here from VMamba's public description of its v2 checkpoints (parameter
names and shapes per config), independently of our model code, so a drift between the two shows up as a failure.
"""

import math
import os
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

import mamba2d  # noqa: F401
import mamba2d.zoo as zoo
from mamba2d.cli import main

K = 4  # VMamba's four scan routes


def vmamba_v2_layout(dims, depths, d_state=1, ssm_ratio=1.0, num_classes=1000, dense=False, device="cpu"):
    """Names and shapes of a VMamba v2 checkpoint (v05_noz SS2D, channel-first, patch-embed v2, downsample v3).

    Classification: patch_embed.{0,2,5,7}, layers.i.blocks.j.{norm, op.*, norm2, mlp.fc1/fc2}, layers.i.downsample.
    {1,3}, classifier.{norm,head}. Dense (mmengine backbone): the same without classifier, plus outnorm0..3.
    """
    shapes = {
        "patch_embed.0.weight": (dims[0] // 2, 3, 3, 3), "patch_embed.0.bias": (dims[0] // 2,),
        "patch_embed.2.weight": (dims[0] // 2,), "patch_embed.2.bias": (dims[0] // 2,),
        "patch_embed.5.weight": (dims[0], dims[0] // 2, 3, 3), "patch_embed.5.bias": (dims[0],),
        "patch_embed.7.weight": (dims[0],), "patch_embed.7.bias": (dims[0],),
    }
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        inner, rank = int(ssm_ratio * dim), math.ceil(dim / 16)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shapes.update({
                p + "norm.weight": (dim,), p + "norm.bias": (dim,),
                p + "op.in_proj.weight": (inner, dim),  # no z gate: d_inner outputs, no bias
                p + "op.conv2d.weight": (inner, 1, 3, 3),  # depthwise, no bias
                p + "op.x_proj_weight": (K, rank + 2 * d_state, inner),
                p + "op.dt_projs_weight": (K, inner, rank),
                p + "op.dt_projs_bias": (K, inner),
                p + "op.A_logs": (K * inner, d_state),
                p + "op.Ds": (K * inner,),
                p + "op.out_norm.weight": (inner,), p + "op.out_norm.bias": (inner,),
                p + "op.out_proj.weight": (dim, inner),
                p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
                p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,),
            })
        if i < len(dims) - 1:
            shapes.update({
                f"layers.{i}.downsample.1.weight": (dims[i + 1], dim, 3, 3),
                f"layers.{i}.downsample.1.bias": (dims[i + 1],),
                f"layers.{i}.downsample.3.weight": (dims[i + 1],), f"layers.{i}.downsample.3.bias": (dims[i + 1],),
            })
    if dense:
        for i, dim in enumerate(dims):
            shapes.update({f"outnorm{i}.weight": (dim,), f"outnorm{i}.bias": (dim,)})
    else:
        shapes.update({
            "classifier.norm.weight": (dims[-1],), "classifier.norm.bias": (dims[-1],),
            "classifier.head.weight": (num_classes, dims[-1]), "classifier.head.bias": (num_classes,),
        })
    g = torch.Generator().manual_seed(0)
    if device == "meta":
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


TINY = dict(dims=(96, 192, 384, 768), depths=(2, 2, 8, 2))  # VMamba-T s1l8
SMALL = dict(dims=(96, 192, 384, 768), depths=(2, 2, 15, 2), ssm_ratio=2.0)  # VMamba-S s2l15
BASE = dict(dims=(128, 256, 512, 1024), depths=(2, 2, 15, 2), ssm_ratio=2.0)  # VMamba-B s2l15
NANO = dict(dims=(32, 64, 128, 256), depths=(1, 1, 2, 1))


class Payload:
    """Pickles as a call to exec: what a malicious checkpoint would hold. Must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("arch", ["vmamba_nano", "vmamba2d_nano"])
def test_official_classification_checkpoint_loads_strictly(tmp_path, arch):
    state = vmamba_v2_layout(**NANO)
    marker = tmp_path / "pwned"
    path = tmp_path / "vssm_nano_ckpt_epoch_1.pth"
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 1, "config": Payload(marker)}, path)

    converted = zoo.convert_vmamba_classification(zoo.read_checkpoint(path))
    model = zoo.load_into(timm.create_model(arch, num_classes=1000), converted, str(path))

    assert not marker.exists(), "reading the checkpoint executed code"
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key in ("patch_embed.0.weight", "layers.2.blocks.1.op.x_proj_weight", "classifier.head.weight"):
        torch.testing.assert_close(loaded[key], state[key])
    model(torch.randn(1, 3, 32, 32))  # and runs


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
@pytest.mark.parametrize("scan", ["vmamba", "vmamba2d"])
def test_published_vmamba_layouts_match_our_models(size, scan):
    """VMamba-T s1l8, S s2l15, B s2l15: every key and shape of the official layout, both scans (as strict loading
    checks them), for the classifier and for the dense backbone."""
    layout = {"tiny": TINY, "small": SMALL, "base": BASE}[size]
    with torch.device("meta"):
        classifier = timm.create_model(f"{scan}_{size}")
        dense = timm.create_model(f"{scan}_{size}", features_only=True)
    zoo.check_state_dict(classifier, vmamba_v2_layout(**layout, device="meta"), size)
    zoo.check_state_dict(dense.model, vmamba_v2_layout(**layout, dense=True, device="meta"), size,
                         missing_ok=("classifier.norm.weight", "classifier.norm.bias"))


@pytest.mark.parametrize("arch", ["vmamba_nano", "vmamba2d_nano"])
def test_mmengine_dense_checkpoint_loads_backbone_and_reports_heads(tmp_path, arch, caplog):
    backbone = vmamba_v2_layout(**NANO, dense=True)
    heads = {"decode_head.conv_seg.weight": torch.randn(150, 32, 1, 1),
             "auxiliary_head.conv_seg.bias": torch.zeros(150)}
    path = tmp_path / "upernet.pth"
    torch.save({"meta": {"epoch": 12, "config": "model = dict(...)"},
                "state_dict": {**{"backbone." + k: v for k, v in backbone.items()}, **heads}}, path)

    converted, others = zoo.convert_mmengine_dense(zoo.read_checkpoint(path))
    assert converted.keys() == backbone.keys() and others.keys() == heads.keys()
    model = timm.create_model(arch, features_only=True)
    zoo.load_into(model, converted, str(path), missing_ok=("classifier.norm.weight", "classifier.norm.bias"))
    torch.testing.assert_close(model.model.outnorm3.weight, backbone["outnorm3.weight"])
    # Without the explicit allowance the unused classifier.norm of the features wrapper is reported missing.
    with pytest.raises(zoo.CheckpointMismatch, match="2 missing keys: classifier.norm.weight"):
        zoo.load_into(timm.create_model(arch, features_only=True), converted, str(path))
    # The generic reader reports the head tensors it leaves out.
    with caplog.at_level("WARNING"):
        assert zoo.read_model_weights(path).keys() == backbone.keys()
    assert "auxiliary_head, decode_head" in caplog.text


def test_mismatches_are_reported_not_swallowed():
    state = vmamba_v2_layout(**NANO, num_classes=10)
    state["layers.0.blocks.0.op.extra_scale"] = torch.ones(1)
    del state["classifier.head.bias"]
    state["layers.1.downsample.1.weight"] = torch.zeros(1, 1, 3, 3)
    model = timm.create_model("vmamba2d_nano", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(zoo.CheckpointMismatch) as err:
        zoo.load_into(model, state, "bad.pth")
    message = str(err.value)
    assert "1 missing keys: classifier.head.bias" in message
    assert "1 unexpected keys: layers.0.blocks.0.op.extra_scale" in message
    assert "layers.1.downsample.1.weight: checkpoint (1, 1, 3, 3) vs model (128, 64, 3, 3)" in message
    for k, v in model.state_dict().items():  # nothing was half-loaded
        torch.testing.assert_close(v, before[k])


def test_converter_errors_name_what_is_there():
    with pytest.raises(zoo.ZooError, match=r"no key 'model'; it has \['state_dict'\]"):
        zoo.convert_vmamba_classification({"state_dict": {}})
    with pytest.raises(zoo.ZooError, match="no key starts with 'backbone.'"):
        zoo.convert_mmengine_dense({"state_dict": {"decode_head.w": torch.zeros(1)}})
    with pytest.raises(zoo.ZooError, match="not tensors"):
        zoo.convert_vmamba_classification({"model": {"a": torch.zeros(1), "b": "text"}})


@pytest.fixture
def private_zoo(tmp_path, monkeypatch):
    """A manifest of our own (with its files beside it) and an empty offline cache home."""
    zoo_dir, home = tmp_path / "zoo", tmp_path / "home"
    zoo_dir.mkdir()
    monkeypatch.setenv(zoo.HOME_ENV, str(home))
    monkeypatch.setenv(zoo.OFFLINE_ENV, "1")
    path = zoo_dir / "manifest.yaml"

    def write(entries) -> zoo.Manifest:
        path.write_text(yaml.safe_dump({"entries": entries}, sort_keys=False))
        return zoo.Manifest.read(path)

    return zoo_dir, home, write


def _entry(name, **fields):
    return {"name": name, "arch": name.split(".")[0], "task": "classification", "layout": "mamba2d",
            "license": "apache-2.0", "provenance": "trained here", "kwargs": {"num_classes": 10}, **fields}


def test_sha256_is_checked_on_load(private_zoo):
    zoo_dir, _, write = private_zoo
    model = timm.create_model("vmamba_nano", num_classes=10)
    sha, size = zoo.export(model.state_dict(), zoo_dir / "good.safetensors")
    (zoo_dir / "bad.safetensors").write_bytes((zoo_dir / "good.safetensors").read_bytes())
    manifest = write([_entry("vmamba_nano.good", file="good.safetensors", sha256=sha, size=size),
                      _entry("vmamba_nano.bad", file="bad.safetensors", sha256="0" * 64, size=size)])

    loaded = zoo.load("vmamba_nano.good", manifest=manifest)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    assert zoo.verify("vmamba_nano.good", manifest=manifest).ok
    with pytest.raises(zoo.ZooHashMismatch) as err:
        zoo.load("vmamba_nano.bad", manifest=manifest)
    assert f"sha256 of {zoo_dir / 'bad.safetensors'} is {sha} but the manifest says {'0' * 64}" in str(err.value)
    assert "reinstall mamba2d" in str(err.value)
    assert main(["zoo", "verify", "--manifest", str(manifest.path)]) == 1


def test_offline_download_says_what_to_get_and_where(private_zoo):
    _, home, write = private_zoo
    url = "https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth"
    manifest = write([_entry("vmamba_nano.in1k", url=url, status=zoo.UNVERIFIED, layout="vmamba-classification",
                             kwargs={"num_classes": 1000})])
    target = home / "checkpoints" / "vssm1_tiny_0230s_ckpt_epoch_264.pth"
    with pytest.raises(zoo.ZooFileMissing) as err:
        zoo.load("vmamba_nano.in1k", manifest=manifest)
    assert f"download {url}" in str(err.value) and f"save it as {target}" in str(err.value)

    # Once the file is where the message says, the unverified entry loads, and the warning gives its sha256.
    state = vmamba_v2_layout(**NANO)
    target.parent.mkdir(parents=True)
    torch.save({"model": state, "epoch": 264}, target)
    with pytest.warns(UserWarning, match=f"sha256 not yet verified.*{zoo.sha256sum(target)}"):
        model = zoo.load("vmamba_nano.in1k", manifest=manifest)
    torch.testing.assert_close(model.state_dict()["layers.3.blocks.0.op.Ds"], state["layers.3.blocks.0.op.Ds"])
    # The same weights, with the 2D scan: one layout serves both.
    with pytest.warns(UserWarning):
        model_2d = zoo.load("vmamba_nano.in1k", arch="vmamba2d_nano", manifest=manifest)
    assert model_2d.scan == "2d"


@pytest.mark.parametrize("progress", [False, True])
def test_zoo_fetch_progress_bar_is_explicit(private_zoo, monkeypatch, capfd, progress):
    zoo_dir, home, write = private_zoo
    monkeypatch.delenv(zoo.OFFLINE_ENV)
    source = zoo_dir / "published.safetensors"
    sha, size = zoo.export(timm.create_model("vmamba_nano", num_classes=10).state_dict(), source)
    manifest = write([_entry("vmamba_nano.web", url=source.as_uri(), sha256=sha, size=size)])
    assert main(["zoo", "fetch", "vmamba_nano.web", "--manifest", str(manifest.path),
                 "--progress", str(progress).lower()]) == 0
    assert (home / "checkpoints" / "published.safetensors").is_file()
    err = capfd.readouterr().err
    assert ("100%" in err) is progress  # torch.hub's tqdm bar ends at 100%


def test_manifest_is_validated(private_zoo):
    _, _, write = private_zoo
    with pytest.raises(zoo.ZooError, match="has no sha256; give one or mark it status: 'sha256 not yet verified'"):
        write([_entry("vmamba_nano.nohash", file="x.safetensors")])
    with pytest.raises(zoo.ZooError, match="provenance 'downloaded somewhere' is not one of"):
        write([_entry("vmamba_nano.x", file="x.safetensors", sha256="0" * 64, provenance="downloaded somewhere")])


def test_the_shipped_manifest_lists_every_entry(capsys):
    names = zoo.list()
    for name in ("vmamba_tiny.in1k", "vmamba_small.in1k", "vmamba_base.in1k", "vmamba_tiny.upernet_ade20k",
                 "vmamba_tiny.maskrcnn_coco_1x", "vmamba2d_nano.digits", "vmamba_nano.digits"):
        assert name in names
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in names)
    for name in names:  # every official entry without a hash says so
        entry = zoo.get(name)
        assert entry.verified or entry.status == zoo.UNVERIFIED
        if entry.provenance == "official":
            assert entry.url.startswith("https://github.com/MzeroMiko/VMamba/releases/download/")


def test_home_defaults_to_the_user_cache(monkeypatch):
    monkeypatch.delenv(zoo.HOME_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    if os.name == "posix" and sys.platform != "darwin":
        assert zoo.home() == Path("/somewhere/cache/mamba2d")
    monkeypatch.setenv(zoo.HOME_ENV, "/data/m2d")
    assert zoo.home() == Path("/data/m2d")


def test_verify_checks_a_downloaded_official_file(private_zoo, capsys):
    """The converter self-check on a file in VMamba's official layout: strict load, sha256 against the manifest,
    norm eps, and the published metric to compare an evaluation with."""
    _, home, write = private_zoo
    url = "https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/vssm_nano_ckpt_epoch_1.pth"
    manifest = write([_entry("vmamba_nano.in1k", url=url, status=zoo.UNVERIFIED, layout="vmamba-classification",
                             provenance="official", kwargs={"num_classes": 1000},
                             metrics={"top1": 12.3, "data": "ImageNet-1K val"})])
    path = home / "checkpoints" / "vssm_nano_ckpt_epoch_1.pth"
    path.parent.mkdir(parents=True)
    torch.save({"model": vmamba_v2_layout(**NANO), "epoch": 1}, path)

    result = zoo.check_file(path, manifest=manifest)
    assert result.ok and (result.layout, result.arch) == ("vmamba-classification", "vmamba_nano")
    assert result.entry.name == "vmamba_nano.in1k" and result.sha256 == zoo.sha256sum(path)
    assert result.norm_eps == [1e-5] and not (result.missing or result.unexpected or result.shapes)
    assert main(["zoo", "verify", "--manifest", str(manifest.path), "--names", "[vmamba_nano.in1k]"]) == 0
    out = capsys.readouterr().out
    for text in (result.sha256, "sha256 not yet verified", "strict load OK", "norm eps    1e-05",
                 "top1 12.3 on ImageNet-1K val", "result      OK"):
        assert text in out, text

    # The same file loaded into the 2D-scan twin, and a file the zoo has never heard of (arch from its shapes).
    assert zoo.check_file(path, arch="vmamba2d_nano", manifest=manifest).ok
    other = home / "renamed.pth"
    other.write_bytes(path.read_bytes())
    assert zoo.check_file(other).arch == "vmamba_nano"


def test_verify_fails_loudly_on_bad_files(tmp_path, capsys):
    state = vmamba_v2_layout(**NANO)
    del state["layers.1.blocks.0.op.Ds"]
    broken = tmp_path / "broken.pth"
    torch.save({"model": state}, broken)
    result = zoo.check_file(broken, arch="vmamba_nano")
    assert not result.ok and result.missing == ["layers.1.blocks.0.op.Ds"]
    assert main(["zoo", "verify", "--file", str(broken), "--arch", "vmamba_nano"]) == 1
    assert "FAILED: 1 missing keys: layers.1.blocks.0.op.Ds" in capsys.readouterr().out

    unknown = tmp_path / "unknown.pth"
    torch.save({"weights": {"a": torch.zeros(1)}, "step": 3}, unknown)
    with pytest.raises(zoo.ZooError, match=rf"{unknown}: unknown checkpoint layout \(top-level keys: \['step', "
                                           r"'weights'\]\)"):
        zoo.check_file(unknown)
    assert main(["zoo", "verify", "--file", str(unknown)]) == 2
    assert "unknown checkpoint layout" in capsys.readouterr().err


def test_zoo_entries_are_timm_pretrained_tags():
    backbones = [n for n in zoo.list() if zoo.get(n).task != "mil"]
    assert sorted(timm.list_pretrained("vmamba*")) == sorted(backbones)
    model = timm.create_model("vmamba2d_nano.digits", pretrained=True)
    cfg = model.pretrained_cfg
    assert cfg["tag"] == "digits" and cfg["file"] == str(zoo.zoo_dir() / "vmamba2d_nano.digits.safetensors")
    assert "state_dict" not in cfg and cfg["num_classes"] == 10 and cfg["mean"] == (0.5, 0.5, 0.5)
    torch.testing.assert_close(model.state_dict(), zoo.load("vmamba2d_nano.digits").state_dict())
    assert timm.create_model("vmamba_tiny", pretrained=False).pretrained_cfg["tag"] == "in1k"
    with pytest.raises(RuntimeError, match="No pretrained weights exist for vmamba2d_tiny"):  # timm's own answer
        timm.create_model("vmamba2d_tiny", pretrained=True)


def test_timm_route_checks_the_manifest_sha256(tmp_path):
    """A file that carries a zoo file's name but other bytes fails before it is read, whichever route reads it."""
    bad = tmp_path / "vmamba2d_nano.digits.safetensors"
    zoo.export(timm.create_model("vmamba2d_nano").state_dict(), bad)
    recorded = zoo.get("vmamba2d_nano.digits").sha256
    with pytest.raises(zoo.CheckpointHashMismatch, match=f"sha256 of {bad} is .* but {recorded} is recorded"):
        timm.create_model("vmamba2d_nano", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(bad), custom_load=True))
    with pytest.raises(zoo.CheckpointHashMismatch):
        zoo.read_model_weights(bad)


def test_zoo_list_says_what_is_recorded_and_what_is_here(capsys):
    assert main(["zoo", "list", "--pattern", "vmamba*"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["name", "task", "provenance", "manifest", "sha256"]
    by_name = {row.split()[0]: row for row in rows}
    assert "recorded" in by_name["vmamba2d_nano.digits"] and "present" in by_name["vmamba2d_nano.digits"]
    assert "not yet verified" in by_name["vmamba_tiny.in1k"]


def test_sha256_follows_the_file(tmp_path):
    """Hashes are remembered per (path, size, mtime) and never outlive a change of the file."""
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 10)
    first = zoo.sha256sum(path)
    assert zoo.sha256sum(path) == first
    path.write_bytes(b"b" * 11)
    assert zoo.sha256sum(path) != first and zoo.sha256sum(path) == zoo.sha256sum(str(path))
