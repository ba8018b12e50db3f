"""`mamba2d-wsi`: the whole-slide pipeline from the command line.

    mamba2d-wsi extract SLIDES... --out FEATURES_DIR [--backbone resnet50] [--mpp 0.5 | --magnification 20]
    mamba2d-wsi heatmap --slide S.svs --features S.h5 --ckpt best.ckpt --out S.png
    mamba2d-wsi splits --csv labels.csv --folds 5 --out splits/ [--task survival]
    mamba2d-wsi kfold --config configs/wsi/....yaml --folds 5 [-- extra LightningCLI arguments]
    mamba2d-wsi spatial-benchmark [--seeds 0 1 2] [--train 128 ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from ..data.spatial_bags import BENCHMARK_BAGS, BENCHMARK_EPOCHS, BENCHMARK_LR, BENCHMARK_SPLITS


def _extract(args: argparse.Namespace) -> int:
    from .extract import extract_slide, find_slides, load_backbone

    slides = find_slides(args.slides)
    embedder = load_backbone(args.backbone, pretrained=args.pretrained, checkpoint=args.checkpoint, device=args.device)
    print(f"{len(slides)} slide(s), backbone {args.backbone} ({embedder.dim}-d features) on {embedder.device}")
    from tqdm.auto import tqdm

    for path in tqdm(slides, desc="slides", unit="slide", disable=len(slides) == 1):
        summary = extract_slide(path, args.out, embedder, args.patch_size, args.mpp, args.magnification,
                                args.tissue_threshold, args.batch_size, args.num_workers, args.assume_mpp,
                                args.overwrite)
        if summary["skipped"]:
            print(f"{path}: {summary['h5']} exists, skipped (--overwrite to redo)")
        else:
            print(f"{path}: {summary['patches']} patches -> {summary['h5']} ({summary['seconds']:.1f} s)")
    return 0


def _heatmap(args: argparse.Namespace) -> int:
    from .heatmap import model_scores, render_heatmap

    coords, scores, stride, logits = model_scores(args.ckpt, args.features, args.patch_stride, args.device)
    out = render_heatmap(args.slide, coords, scores, stride, args.out, args.thumbnail_size, args.alpha, args.cmap,
                         args.normalize)
    print(f"{out}: {len(scores)} patches, bag logits {np.round(logits.numpy(), 4).tolist()}")
    return 0


def _splits(args: argparse.Namespace) -> int:
    from ..data.splits import make_kfold_splits, read_csv_rows, write_split_file

    if args.task == "classification":
        rows = read_csv_rows(args.csv, ["slide_id", args.label_column])
        id_column = "case_id" if "case_id" in rows[0] else "slide_id"
        strata = {row[id_column]: row[args.label_column] for row in rows}
    else:
        rows = read_csv_rows(args.csv, ["slide_id", "censorship"])
        id_column = "case_id" if "case_id" in rows[0] else "slide_id"
        strata = {row[id_column]: row["censorship"] for row in rows}
    ids = list(strata)
    folds = make_kfold_splits(ids, [strata[i] for i in ids], args.folds, args.val_fraction, args.seed)
    if id_column == "case_id" and args.task == "classification":
        # Classification splits list slides: expand each case to its slides so a case never straddles splits.
        slides_of: dict[str, list[str]] = {}
        for row in rows:
            slides_of.setdefault(row["case_id"], []).append(row["slide_id"])
        folds = [{name: [s for case in ids_ for s in slides_of[case]] for name, ids_ in fold.items()} for fold in folds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for k, fold in enumerate(folds):
        write_split_file(out / f"splits_{k}.csv", fold)
    stratified_by = args.label_column if args.task == "classification" else "censorship"
    print(f"wrote {args.folds} folds ({id_column}s, stratified by {stratified_by}) to {out}")
    return 0


def run_kfold(config: str, folds: list[int], extra: list[str]) -> dict[str, list[float]]:
    """Fit and test (best val checkpoint) every fold; returns {metric: [value per fold]}."""
    from ..cli.lightning import build_cli

    results: dict[str, list[float]] = {}
    for fold in folds:
        cli = build_cli(["--config", config, "--data.init_args.fold", str(fold), *extra], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        best = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
        (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or "last")
        print(f"fold {fold}: best checkpoint {best or '(none)'}; " +
              ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())), flush=True)
        for key, value in metrics.items():
            results.setdefault(key, []).append(float(value))
    return results


def format_kfold(results: dict[str, list[float]]) -> str:
    lines = ["| metric | mean ± std | per fold |", "|---|---|---|"]
    for key in sorted(results):
        values = np.array(results[key])
        lines.append(f"| {key} | {values.mean():.4f} ± {values.std():.4f} | "
                     + ", ".join(f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines)


def _kfold(args: argparse.Namespace, extra: list[str]) -> int:
    folds = args.fold_ids if args.fold_ids else list(range(args.folds))
    results = run_kfold(args.config, folds, extra)
    table = format_kfold(results)
    print(table)
    if args.summary:
        Path(args.summary).write_text(json.dumps({"folds": folds, "metrics": results}, indent=2))
    return 0


def _spatial_benchmark(args: argparse.Namespace) -> int:
    import torch

    from ..data.spatial_bags import SpatialBagConfig
    from .spatial_benchmark import format_table, run_spatial_benchmark

    torch.set_num_threads(args.threads)

    config = SpatialBagConfig(grid_min=args.grid_min, grid_max=args.grid_max, positive_min=args.positive_min,
                              positive_max=args.positive_max, feature_dim=args.feature_dim, amplitude=args.amplitude)
    rows = run_spatial_benchmark(args.models, args.seeds, args.train, args.val, args.test, args.epochs, args.lr,
                                 config)
    for row in rows:
        print(f"{row['model']} seed {row['seed']}: acc {row['acc']:.3f} auroc {row['auroc']:.3f}")
    print(format_table(rows, config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mamba2d-wsi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="tile slides, embed tissue patches, write CLAM-format h5 bags")
    p.add_argument("slides", nargs="+", help="slide files or folders of slides (svs, tif, ndpi, mrxs, ...)")
    p.add_argument("--out", required=True, help="folder for <slide_id>.h5")
    p.add_argument("--backbone", default="resnet50", help="timm or mamba2d zoo model name (default resnet50)")
    p.add_argument("--pretrained", action="store_true", help="load the backbone's pretrained weights (may download)")
    p.add_argument("--checkpoint", help="local backbone weights (.safetensors or torch state dict)")
    p.add_argument("--patch-size", type=int, default=224, help="patch side in pixels at the target resolution")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--mpp", type=float, help="target µm/px (default 0.5)")
    group.add_argument("--magnification", type=float, help="target magnification, e.g. 20")
    p.add_argument("--assume-mpp", type=float, help="level-0 µm/px for slides without resolution metadata")
    p.add_argument("--tissue-threshold", type=float, default=0.5, help="minimum tissue fraction of a kept patch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose h5 already exists")
    p.set_defaults(func=_extract)

    p = sub.add_parser("heatmap", help="overlay a trained model's per-patch scores on the slide thumbnail (PNG)")
    p.add_argument("--slide", required=True)
    p.add_argument("--features", required=True, help="the slide's h5 bag")
    p.add_argument("--ckpt", required=True, help="SlideMIL checkpoint (e.g. runs/.../checkpoints/best.ckpt)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--patch-stride", type=int, help="grid cell in level-0 px when the h5 lacks patch attributes")
    p.add_argument("--thumbnail-size", type=int, default=2048)
    p.add_argument("--alpha", type=float, default=0.45)
    p.add_argument("--cmap", default="jet")
    p.add_argument("--normalize", choices=("rank", "minmax"), default="rank")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_heatmap)

    p = sub.add_parser("splits", help="write stratified k-fold splits_{k}.csv (train/val/test)")
    p.add_argument("--csv", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--task", choices=("classification", "survival"), default="classification")
    p.add_argument("--label-column", default="label")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_splits)

    p = sub.add_parser("kfold", help="fit + test every fold of a config; print mean ± std per metric",
                       description="Arguments after `--` go to LightningCLI, e.g. -- --trainer.max_epochs 5")
    p.add_argument("--config", required=True)
    p.add_argument("--folds", type=int, default=5, help="run folds 0..folds-1")
    p.add_argument("--fold-ids", type=int, nargs="+", help="run these folds instead")
    p.add_argument("--summary", help="also write the per-fold metrics as JSON here")
    p.set_defaults(func=_kfold)

    p = sub.add_parser("spatial-benchmark", help="synthetic compact-vs-scattered bags: every model, mean over seeds")
    p.add_argument("--models", nargs="+", default=["mamba_mil_2d", "mamba_mil_1d", "abmil", "transmil", "mean", "max"])
    bags, splits = BENCHMARK_BAGS, BENCHMARK_SPLITS
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train", type=int, default=splits["train"])
    p.add_argument("--val", type=int, default=splits["val"])
    p.add_argument("--test", type=int, default=splits["test"])
    p.add_argument("--epochs", type=int, default=BENCHMARK_EPOCHS)
    p.add_argument("--lr", type=float, default=BENCHMARK_LR)
    p.add_argument("--grid-min", type=int, default=bags.grid_min, help="bag grid side, drawn per bag in [min, max]")
    p.add_argument("--grid-max", type=int, default=bags.grid_max)
    p.add_argument("--positive-min", type=int, default=bags.positive_min,
                   help="positive patches per bag, same range in both classes")
    p.add_argument("--positive-max", type=int, default=bags.positive_max)
    p.add_argument("--feature-dim", type=int, default=bags.feature_dim)
    p.add_argument("--amplitude", type=float, default=bags.amplitude)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on bags this small, threading costs more than it gains)")
    p.set_defaults(func=_spatial_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "kfold":
        return _kfold(args, extra)
    if extra:
        raise SystemExit(f"mamba2d-wsi {args.command}: unexpected arguments after --: {extra}")
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
