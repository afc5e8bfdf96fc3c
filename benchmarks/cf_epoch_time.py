"""Seconds per CF epoch (training, then validation) on a run's split, for backbone / batch size / ``ssl_nodes``
settings, one thread each, one after another in this process: what sizes a CPU config for a big catalogue.

    python benchmarks/cf_epoch_time.py RUN lightgcn:8192 sgl:8192:2048 simgcl:8192:2048 bias-mf:8192

Each spec is ``backbone:batch_size[:ssl_nodes]``. Features are ``text`` with the run's item-text embeddings
when it has them (else random vectors of the same shape: the time does not depend on their values); with
``--features text+profiles`` every user and item also gets a distinct random profile vector (the worst case for
the profile branch, which runs once per distinct profile).

    python benchmarks/cf_epoch_time.py RUN bias-mf:8192 lightgcn:8192 --features text+profiles
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from reclm.cf import CFConfig, SideFeatures, train_cf
from reclm.rundir import RunDir


def item_text(run: Path, n_items: int) -> np.ndarray:
    path = run / "embeddings" / "item_text.npz"
    if path.is_file():
        return np.load(path)["vectors"]
    return np.random.default_rng(0).standard_normal((n_items, 384)).astype("float32")


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, 384)).astype("float32")
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_features(run: Path, split, mode: str) -> SideFeatures:
    text = item_text(run, split.n_items)
    if mode == "text":
        return SideFeatures(item_text=text)
    users, items = unit_rows(split.n_users, 1), unit_rows(split.n_items, 2)
    return SideFeatures(item_text=text, user_profiles=users, item_profiles=items)


def epoch_seconds(split, features: SideFeatures, spec: str, out: Path, mode: str = "text") -> tuple[float, float]:
    backbone, batch, *ssl = spec.split(":")
    config = CFConfig(
        backbone=backbone, features=mode, lr=3e-3, epochs=1, threads=1, batch_size=int(batch),
        ssl_nodes=int(ssl[0]) if ssl else None,
    )  # fmt: skip
    train_cf(split, config, features, out, show_progress=False)
    first = json.loads((out / "history.json").read_text())[0]
    return first["train_seconds"], first["eval_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("specs", nargs="+", help="backbone:batch_size[:ssl_nodes]")
    parser.add_argument("--features", default="text", choices=["text", "text+profiles"])
    args = parser.parse_args()
    data, split = RunDir(args.run).load()
    features = make_features(args.run, split, args.features)
    print(f"{len(split.train):,} train pairs, {split.n_users:,} users, {split.n_items:,} items; one thread each")
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.specs):
            train, evaluate = epoch_seconds(split, features, spec, Path(tmp) / str(i), args.features)
            baseline = baseline or train
            ratio = train / baseline
            print(f"{spec:24} train {train:7.1f} s  validation {evaluate:6.1f} s  train / first spec {ratio:5.2f}")


if __name__ == "__main__":
    main()
