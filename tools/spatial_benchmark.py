"""Spatial MIL benchmark: every model on synthetic bags labelled by the arrangement of positive patches.

Prints one line per (model, seed) as it finishes, then a markdown table of test accuracy and AUROC (mean ± std over
seeds). Same as `mamba2d wsi benchmark`; run with --help for the sizes. Example (the table in docs/wsi.md):

    python tools/spatial_benchmark.py --seeds '[0, 1, 2]' --train 128 --val 48 --test 128 --epochs 10
"""

import sys

from mamba2d.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["wsi", "benchmark", *sys.argv[1:]]))
