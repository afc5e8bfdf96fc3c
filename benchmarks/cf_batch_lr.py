"""Does a larger batch (fewer full-graph passes per epoch) with a larger learning rate reach the same validation
score in less time? One CF run per ``backbone:batch_size:lr`` spec on a run's split, ``text`` features, one
thread, early stopping on validation; prints one JSON line per spec (best epoch, validation NDCG@20, test and
zero-shot Recall@20, seconds per epoch, wall clock).

    python benchmarks/cf_batch_lr.py RUN lightgcn:8192:0.003 lightgcn:32768:0.01 --epochs 60

Run two specs side by side (two processes) to compare them on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from reclm.cf import CFConfig, SideFeatures, train_cf
from reclm.rundir import RunDir


def run_spec(split, features: SideFeatures, spec: str, epochs: int, patience: int) -> dict:
    backbone, batch, lr = spec.split(":")
    config = CFConfig(
        backbone=backbone, features="text", lr=float(lr), epochs=epochs, patience=patience, threads=1,
        batch_size=int(batch), ssl_nodes=2048,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train_cf(split, config, features, Path(tmp), show_progress=False)
        wall = time.perf_counter() - start
        metrics = json.loads((Path(tmp) / "metrics.json").read_text())
        history = json.loads((Path(tmp) / "history.json").read_text())
    best = max(history, key=lambda row: row["valid"]["ndcg@20"])
    return {
        "spec": spec,
        "wall_s": round(wall),
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "valid_ndcg20": round(best["valid"]["ndcg@20"], 4),
        "test_r20": round(metrics["test"]["recall@20"], 4),
        "zs_r20": round(metrics.get("zero_shot", {}).get("recall@20", float("nan")), 4),
        "s_per_epoch": round(float(np.mean([row["train_seconds"] for row in history])), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory with a split and embeddings/item_text.npz")
    parser.add_argument("specs", nargs="+", help="backbone:batch_size:lr")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=10)
    args = parser.parse_args()
    _, split = RunDir(args.run).load()
    features = SideFeatures(item_text=np.load(args.run / "embeddings" / "item_text.npz")["vectors"])
    for spec in args.specs:
        print(json.dumps(run_spec(split, features, spec, args.epochs, args.patience)), flush=True)


if __name__ == "__main__":
    main()
