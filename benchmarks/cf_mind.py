"""MIND, the paper's "base" setting: the five backbones with ``--features text`` (items = MLP(text
embedding), no item IDs; users = ID embeddings), full-shot and zero-shot, on the release's snapshot
split with a validation set carved from train (10% of each user's train clicks, seeded; a user's
only click stays in train). Test and zero-shot are read at the best validation epoch (the paper
picked epochs on test, so its numbers are optimistic). Prints our table beside the paper's base rows.

    nice -n 10 python benchmarks/cf_mind.py                 # all five backbones
    python benchmarks/cf_mind.py --backbones lightgcn --epochs 20

Item text = category, subcategory, title and abstract, embedded once with the packaged
all-MiniLM-L6-v2 (cached on disk afterwards).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reclm.cf import CFConfig, load_side_features, train_cf
from reclm.cf.config import BACKBONES
from reclm.data.loaders import load_dataset
from reclm.data.split import SplitSpec, make_split

ROOT = Path(__file__).resolve().parent.parent
MIND = ROOT.parent / "shared" / "datasets" / "mind"
# Recall@20 / NDCG@20 of the paper's base rows (../shared/datasets/README.md)
PAPER_BASE = {
    "full": {
        "bias-mf": (0.0683, 0.0311),
        "ncf": (0.0713, 0.0325),
        "lightgcn": (0.0389, 0.0150),
        "sgl": (0.0345, 0.0127),
        "simgcl": (0.0421, 0.0155),
    },
    "zero": {
        "bias-mf": (0.0096, 0.0031),
        "ncf": (0.0301, 0.0080),
        "lightgcn": (0.0138, 0.0046),
        "sgl": (0.0162, 0.0062),
        "simgcl": (0.0164, 0.0055),
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=MIND)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--reg-weight", type=float, default=None, help="(default: CFConfig's)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_mind")
    args = parser.parse_args()
    console = Console()

    data = load_dataset(args.data)
    split = make_split(data, SplitSpec(method="snapshot", ratios=(0.9, 0.1, 0.0), seed=args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    split.save(args.out / "split")
    console.print(f"MIND split: {split.stats()}")
    start = time.perf_counter()
    features = load_side_features(data, "text")
    console.print(f"item text embeddings {features.item_text.shape} in {time.perf_counter() - start:.1f} s")

    results = {}
    for backbone in args.backbones.split(","):
        config = CFConfig(
            backbone=backbone,
            features="text",
            epochs=args.epochs,
            patience=args.patience,
            eval_every=args.eval_every,
            threads=args.threads,
            seed=args.seed,
            **({"reg_weight": args.reg_weight} if args.reg_weight is not None else {}),
        )
        start = time.perf_counter()
        result = train_cf(split, config, features, args.out / config.run_name(), user_ids=data.user_ids)
        results[backbone] = {
            "test": result.test,
            "zero_shot": result.zero_shot,
            "valid": result.valid,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "epoch_seconds": result.epoch_seconds,
            "eval_seconds": result.eval_seconds,
            "wall_seconds": time.perf_counter() - start,
        }
        console.print(f"{backbone}: {json.dumps(results[backbone]['test'])}")
        (args.out / "results.json").write_text(json.dumps(results, indent=2))

    table = Table(title="MIND, features=text (paper: 'base'); ours selected on validation, paper on test")
    for column in ("backbone", "setting", "ours R@20", "ours N@20", "paper R@20", "paper N@20", "ours R@40",
                   "best ep", "s/epoch", "wall s"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("backbone", "setting") else "right")
    for backbone, r in results.items():
        for setting, key in (("full-shot", "test"), ("zero-shot", "zero_shot")):
            paper = PAPER_BASE["full" if key == "test" else "zero"][backbone]
            table.add_row(
                backbone,
                setting,
                f"{r[key]['recall@20']:.4f}",
                f"{r[key]['ndcg@20']:.4f}",
                f"{paper[0]:.4f}",
                f"{paper[1]:.4f}",
                f"{r[key]['recall@40']:.4f}",
                str(r["best_epoch"]),
                f"{r['epoch_seconds']:.2f}",
                f"{r['wall_seconds']:.0f}",
            )
    console.print(table)
    console.print(f"written {args.out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
