"""`extract_features` over several processes: two CPU processes (gloo) here, two GPUs on a GPU machine, and two
torchrun "nodes" on one host standing in for a multi-node run (extraction and MIL training, docs/wsi.md's recipe)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from mil_helpers import classification_folder

from mamba2d.wsi.extract import _end_process_group, bag_is_complete, extract_features, throughput_per_device

SMALL = {"backbone": "resnet18", "patch_size": 32, "mpp": 1.0, "batch_size": 32, "progress": False}


def test_two_cpu_processes_share_the_slides_and_resume(make_test_slide, tmp_path):
    slides = [make_test_slide(f"s{i}.tif") for i in range(4)]
    out = tmp_path / "features"
    (done,) = extract_features(slides[:1], out, accelerator="cpu", **SMALL)
    summaries = extract_features(slides, out, accelerator="cpu", devices=2, strategy="ddp_spawn", **SMALL)
    assert [s["slide"] for s in summaries] == [str(p) for p in slides]
    assert summaries[0]["skipped"] and not any(s["skipped"] for s in summaries[1:])  # resumed: s0 was complete
    assert sorted(s["rank"] for s in summaries[1:]) == [0, 0, 1]  # three slides left, shared by both processes
    assert all(bag_is_complete(out / f"s{i}.h5") for i in range(4))
    assert all((out / "previews" / f"s{i}.png").is_file() for i in range(4))
    table = throughput_per_device(summaries)
    assert set(table) == {0, 1} and sum(row["patches"] for row in table.values()) == 3 * done["patches"]
    assert all(row["patches_per_s"] > 0 and row["device"] == "cpu" for row in table.values())


def test_the_exit_handler_ends_the_default_process_group(tmp_path):
    """What a spawned extraction process runs at exit (registered where the launch made the group): the default
    group destroyed while the interpreter is whole; nothing to do without one."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _end_process_group()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _end_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_share_the_slides(make_test_slide, tmp_path, capsys):
    slides = [make_test_slide(f"s{i}.tif") for i in range(8)]
    summaries = extract_features(slides, tmp_path, accelerator="gpu", devices=2, strategy="ddp_spawn",
                                 **{**SMALL, "backbone": "resnet50", "patch_size": 224, "mpp": 0.5})
    table = throughput_per_device(summaries)
    assert {row["device"] for row in table.values()} == {"cuda:0", "cuda:1"}
    assert all(bag_is_complete(tmp_path / f"s{i}.h5") for i in range(8))
    with capsys.disabled():
        for rank, row in sorted(table.items()):
            print(f"rank {rank} ({row['device']}): {row['patches']} patches, {row['patches_per_s']:.1f} patches/s, "
                  f"{row['embed_patches_per_s']:.1f} reading and embedding")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun_two_nodes(script, tmp_path) -> list[str]:
    """Run `script OUT_JSON` as two torchrun nodes of one process each on this host; return their logs."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                               str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
                               str(port), str(script), str(tmp_path / f"node{rank}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    return logs


@pytest.mark.slow
def test_two_torchrun_nodes_on_one_host(make_test_slide, tmp_path):
    """The multi-node recipe of docs/wsi.md: one torchrun per node, `num_nodes=2` in the library call."""
    slides = [make_test_slide(f"s{i}.tif") for i in range(3)]
    script = tmp_path / "extract.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from mamba2d.wsi.extract import extract_features
        summaries = extract_features({[str(p) for p in slides]!r}, {str(tmp_path / "out")!r}, accelerator="cpu",
                                     devices=1, num_nodes=2, **{SMALL!r})
        json.dump(summaries, open(sys.argv[1], "w"))
    """))
    _torchrun_two_nodes(script, tmp_path)
    results = [json.loads((tmp_path / f"node{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1]  # every process returns the whole run's summaries
    assert sorted(s["rank"] for s in results[0]) == [0, 0, 1]
    assert all(bag_is_complete(tmp_path / "out" / f"s{i}.h5") for i in range(3))


@pytest.mark.slow
def test_mil_training_on_two_torchrun_nodes(tmp_path):
    """`num_nodes=2` under two torchrun nodes: one DDP run of world size 2, the training bags shared by the ranks."""
    csv = classification_folder(tmp_path, n=12, dim=8)  # 6 train bags
    script = tmp_path / "fit.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import lightning
        from mamba2d.data.slides import SlideBagDataModule
        from mamba2d.tasks.mil import SlideMIL

        class Seen(lightning.Callback):
            bags = []
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                self.bags.append(batch["bag_id"])

        data = SlideBagDataModule({str(tmp_path)!r}, {str(csv)!r})
        trainer = lightning.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", max_epochs=1,
                                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, callbacks=[Seen()],
                                    default_root_dir={str(tmp_path)!r})
        trainer.fit(SlideMIL("mean", in_dim=8, num_classes=2), datamodule=data)
        json.dump({{"rank": trainer.global_rank, "world": trainer.world_size, "bags": Seen.bags}},
                  open(sys.argv[1], "w"))
    """))
    _torchrun_two_nodes(script, tmp_path)
    ranks = [json.loads((tmp_path / f"node{rank}.json").read_text()) for rank in range(2)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert [len(r["bags"]) for r in ranks] == [3, 3]
    assert sorted(ranks[0]["bags"] + ranks[1]["bags"]) == [f"s{i:02d}" for i in range(6)]
