"""A 150,000-patch bag loads through the DataModule and takes a 2DMambaMIL training step in bounded memory.

Runs in a subprocess so that its peak resident memory is the step's own: the high-water mark of its own address
space (VmHWM). Not ru_maxrss: Linux carries the parent's resident size over exec into it, so a pytest process grown
past the bound by earlier tests failed this test with a step that stayed well under it. On CPU the reference scan
works in channel chunks of `scan_memory_mb` under activation checkpointing, so its working set does not grow with
the bag.
glibc's malloc keeps freed blocks of a few MB in its heap (its mmap threshold rises as blocks are freed), which
inflates the resident size of chunked CPU runs many times over; a fixed threshold (MALLOC_MMAP_THRESHOLD_, as
docs/wsi.md recommends for big bags on CPU) hands them back to the system.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

STEP = textwrap.dedent("""
    import json, resource, sys, time

    def peak_mb():
        try:  # this process's own high-water mark (ru_maxrss would include the parent's size at exec)
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from pathlib import Path
    import h5py, numpy as np, torch
    from mamba2d.data.slides import SlideBagDataModule
    from mamba2d.tasks.mil import SlideMIL

    root, n, side, dim = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = np.random.default_rng(0)
    cells = rng.choice(side * side, size=n, replace=False)   # a sparse slide: n patches in a side x side box
    with h5py.File(root / "big.h5", "w") as f:
        f["features"] = rng.standard_normal((n, 32), dtype=np.float32)
        f["coords"] = np.stack([cells % side, cells // side], 1) * 256
        f["coords"].attrs["patch_size_level0"] = 256
    (root / "labels.csv").write_text("slide_id,label,split\\nbig,1,train\\n")
    data = SlideBagDataModule(str(root), str(root / "labels.csv"), class_names=["0", "1"])
    data.setup("fit")
    before = peak_mb()
    start = time.perf_counter()
    bag = next(iter(data.train_dataloader()))
    module = SlideMIL("mamba_mil_2d", in_dim=32, num_classes=2,
                      model_args={"dim": dim, "expand": 1, "scan_memory_mb": 256})
    loss = module._loss(module(bag).logits, bag)
    loss.backward()
    grads = sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)
    peak = peak_mb()
    print(json.dumps({"patches": len(bag["features"]), "grid": [int(v) + 1 for v in bag["positions"].max(0).values],
                      "seconds": time.perf_counter() - start, "peak_mb": peak, "before_mb": before,
                      "loss": float(loss), "grad_sum": grads}))
""")


@pytest.mark.slow
def test_150k_patch_bag_trains_in_bounded_memory(tmp_path):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", STEP, str(tmp_path), "150000", "400", "16"], capture_output=True,
                            text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert report["patches"] == 150_000 and report["grid"] == [400, 400]
    assert math.isfinite(report["loss"]) and report["grad_sum"] > 0
    # A one-call reference scan would keep ~58 tensors of 16 channels x 16 states x 160,000 cells x 4 B (9.5 GB)
    # for backward; the chunked scan keeps one channel's worth at a time.
    assert report["peak_mb"] < 3000
