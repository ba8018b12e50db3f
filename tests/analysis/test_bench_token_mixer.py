"""tools/bench_token_mixer.py on CPU with tiny maps: every mixer, size and pass is timed, the JSON, table and figure
are written, a size that runs out of memory or is too large for attention is recorded, not raised, and the
model-speed checks compute the ratios they name."""

import json

import pytest
import torch
from PIL import Image
from repo_tools import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("bench_token_mixer")


def test_cpu_run_writes_every_record_the_table_and_the_figure(tool, tmp_path, capsys):
    out_json, out_png = tmp_path / "mixers.json", tmp_path / "mixers.png"
    assert tool.main(["--device", "cpu", "--dim", "16", "--sizes", "4", "8", "--reps", "1", "--warmup", "0",
                      "--json", str(out_json), "--figure", str(out_png)]) == 0
    result = json.loads(out_json.read_text())
    assert (result["precision"], result["batch"], result["dim"], result["heads"]) == ("bf16", 1, 16, 4)
    records = {(r["mixer"], r["pass"], r["side"]): r for r in result["records"]}
    assert set(records) == {(m, p, s) for m in ("2d", "1d", "sdpa") for p in ("fwd", "fwd+bwd") for s in (4, 8)}
    for r in records.values():
        assert r["status"] == "ok" and r["ms"] > 0 and r["reps"] == 1
        assert r["peak_gb"] is None  # no per-call peak memory on CPU
    assert records[("2d", "fwd", 8)]["pixel_ratio"] == 4
    assert records[("2d", "fwd", 8)]["time_ratio"] == records[("2d", "fwd", 8)]["ms"] / records[("2d", "fwd", 4)]["ms"]
    assert records[("2d", "fwd", 4)]["time_ratio"] is None
    assert len(result["targets"]) == 8 and all(c["met"] is None for c in result["targets"])  # no 32²..1024² run

    table = capsys.readouterr().out.splitlines()
    assert "CPU" in table[0] and "bf16 = bfloat16 autocast" in table[0] and "GB = 10^9 bytes" in table[0]
    assert "batch 1, C = 16" in table[0]
    assert sum(line.startswith(("| 2d |", "| 1d |", "| sdpa |")) for line in table) == 12

    with Image.open(out_png) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 500


def test_out_of_memory_and_oversized_attention_are_recorded(tool, tmp_path, monkeypatch, capsys):
    make_input = tool.make_input

    def short_of_memory(name, batch, dim, side, device):
        if side == 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return make_input(name, batch, dim, side, device)

    monkeypatch.setattr(tool, "make_input", short_of_memory)
    out_json = tmp_path / "sdpa.json"
    assert tool.main(["--device", "cpu", "--mixers", "sdpa", "--dim", "8", "--heads", "2", "--sizes", "4", "8", "16",
                      "--sdpa-max-side", "8", "--reps", "1", "--warmup", "0", "--json", str(out_json)]) == 0
    records = json.loads(out_json.read_text())["records"]
    assert [(r["pass"], r["side"], r["status"]) for r in records] == [
        (p, s, status) for p in ("fwd", "fwd+bwd") for s, status in ((4, "ok"), (8, "OOM"), (16, "skipped"))]
    assert all(r["ms"] is None and r["time_ratio"] is None for r in records if r["side"] > 4)
    assert "| sdpa | fwd | 8² | 64 | OOM |" in capsys.readouterr().out


def test_targets_compute_the_model_speed_ratios(tool):
    def rec(mixer, pass_name, side, ms):
        return {"mixer": mixer, "pass": pass_name, "side": side, "pixels": side * side, "ms": ms}

    records = [rec("2d", "fwd", 512, 10.0), rec("2d", "fwd", 1024, 40.0),
               rec("2d", "fwd+bwd", 512, 10.0), rec("2d", "fwd+bwd", 1024, 50.0),
               rec("2d", "fwd", 32, 1.0), rec("sdpa", "fwd", 32, 2.0),
               rec("2d", "fwd+bwd", 32, 3.0), rec("sdpa", "fwd+bwd", 32, 2.0),
               rec("2d", "fwd", 64, 1.0), rec("sdpa", "fwd", 64, None)]  # sdpa ran out of memory
    checks = {c["check"]: (c["value"], c["target"], c["met"]) for c in tool.targets(records)}
    assert checks == {
        "2d fwd time 1024² / 512²": (4.0, 4.2, True),
        "2d fwd+bwd time 1024² / 512²": (5.0, 4.2, False),
        "2d / sdpa fwd time at 32²": (0.5, 1.0, True),
        "2d / sdpa fwd+bwd time at 32²": (1.5, 1.0, False),
        **{f"2d / sdpa {p} time at {s}²": (None, 1.0, None) for s in (64, 128) for p in ("fwd", "fwd+bwd")},
    }

    for r in records:
        r.update(status="ok" if r["ms"] else "OOM", peak_gb=None, reps=1)
    tool.add_scaling(records)
    table = tool.markdown(records, tool.targets(records), "header").splitlines()
    assert "| 2d fwd time 1024² / 512² | 4.00 | ≤ 4.2 | meets |" in table
    assert "| 2d fwd+bwd time 1024² / 512² | 5.00 | ≤ 4.2 | misses |" in table
    assert "| 2d / sdpa fwd time at 64² | — | ≤ 1.0 | not measured |" in table


def test_scan_tuning_from_the_environment_reaches_the_mixers(tool, monkeypatch, capsys):
    """MAMBA2D_SCAN_TUNE puts the mixers' scans under that tuning (scan_tuning.models_use) and the table says so;
    unset, the mixers call the public op untouched."""
    seen = []
    models_use = tool.scan_tuning.models_use

    def spy(tuning):
        seen.append(tuning)
        return models_use(tuning)

    monkeypatch.setattr(tool.scan_tuning, "models_use", spy)
    args = ["--device", "cpu", "--mixers", "2d", "--dim", "8", "--sizes", "4", "--reps", "1", "--warmup", "0"]
    monkeypatch.delenv(tool.scan_tuning.ENV, raising=False)
    assert tool.main(args) == 0
    assert seen == [] and "scan tuning" not in capsys.readouterr().out
    monkeypatch.setenv(tool.scan_tuning.ENV, "WIDEK=2")
    assert tool.main(args) == 0
    assert [t.wide_cols_per_thread for t in seen] == [2]
    assert "scan tuning MAMBA2D_SCAN_TUNE=WIDEK=2" in capsys.readouterr().out.splitlines()[0]


def test_cuda_graph_timing_needs_a_cuda_device(tool, capsys):
    """--cuda-graph times a captured graph's replay, which only a CUDA device has: refused on CPU, saying why."""
    with pytest.raises(SystemExit):
        tool.main(["--device", "cpu", "--sizes", "4", "--cuda-graph"])
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err
