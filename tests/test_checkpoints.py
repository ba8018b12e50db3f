"""Unreadable checkpoint files (truncated, empty, foreign) give an error that names the file and says it is corrupt,
never a loader's internals or its advice to unpickle with weights_only=False."""

import pytest
import torch
from safetensors.torch import save_file

from mamba2d.checkpoints import CheckpointError, check_checkpoint_file, read_checkpoint


@pytest.fixture
def whole(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"weight": torch.randn(64, 64)}}, path)
    return path


def _damaged(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_whole_files_pass(whole, tmp_path):
    check_checkpoint_file(whole)
    assert set(read_checkpoint(whole)["state_dict"]) == {"weight"}
    tensors = tmp_path / "model.safetensors"
    save_file({"weight": torch.randn(8, 8)}, tensors)
    check_checkpoint_file(tensors)
    assert read_checkpoint(tensors)["weight"].shape == (8, 8)


@pytest.mark.parametrize("damage", ["half", "tail", "garbage", "empty", "flipped"])
def test_damaged_torch_files_are_named_as_corrupt(whole, tmp_path, damage):
    data = whole.read_bytes()
    if damage == "flipped":  # same length, one payload byte changed: only the CRC can tell
        middle = len(data) // 2
        data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
    data = {"half": data[: len(data) // 2], "tail": data[:-30], "garbage": b"hello world" * 10, "empty": b"",
            "flipped": data}[damage]
    path = _damaged(tmp_path, f"{damage}.ckpt", data)
    with pytest.raises(CheckpointError, match="corrupt or not a checkpoint") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and "weights_only" not in str(info.value)
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


@pytest.mark.parametrize("damage", ["half", "header", "garbage"])
def test_damaged_safetensors_are_named_as_corrupt(tmp_path, damage):
    good = tmp_path / "good.safetensors"
    save_file({"weight": torch.randn(32, 32)}, good)
    data = good.read_bytes()
    data = {"half": data[: len(data) // 2], "header": data[:8] + b"{not json" + data[17:],
            "garbage": b"\x00" * 4}[damage]
    path = _damaged(tmp_path, f"{damage}.safetensors", data)
    with pytest.raises(CheckpointError, match="corrupt or not a checkpoint") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        check_checkpoint_file(tmp_path / "nope.ckpt")
