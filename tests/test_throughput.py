"""Throughput tool on CPU with small settings: every mode and precision runs and the table is printed."""

from mamba2d.analysis import throughput


def test_cpu_throughput_table(capsys):
    assert throughput.main(["vmamba2d_nano", "--batch", "1", "--size", "32", "--device", "cpu",
                            "--warmup", "1", "--iters", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == throughput.HEADER
    rows = lines[2:]
    assert [(r.split()[1], r.split()[2]) for r in rows] == [
        ("inference", "fp32"), ("inference", "amp"), ("training", "fp32"), ("training", "amp")]
    for row in rows:
        images_per_s, peak_mb = float(row.split()[5]), float(row.split()[6])
        assert images_per_s > 0 and peak_mb > 0
        assert row.endswith("process peak RSS")


def test_bf16_precision_is_selectable(capsys):
    assert throughput.main(["vmamba2d_nano", "--batch", "1", "--size", "32", "--device", "cpu", "--modes", "training",
                            "--precisions", "bf16", "--warmup", "1", "--iters", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [(r.split()[1], r.split()[2]) for r in rows] == [("training", "bf16")]
