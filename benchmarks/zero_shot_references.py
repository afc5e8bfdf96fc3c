"""Reference rankers for a run's zero-shot task: where chance is, what content alone reaches, and how
concentrated the test clicks are. Read a model's zero-shot number against these before calling it a gain.

    python benchmarks/zero_shot_references.py RUN [--k 20]

Rows (Recall@K over the zero-shot test users, candidates = the zero-shot items, as the evaluator ranks):
- ``random``: the exact expectation of a random ranking (``Evaluator.chance``);
- ``content (item text)`` / ``content (item profiles)``: cosine between an item's embedding and the mean
  embedding of the user's train items (no training at all);
- ``like train's popular items``: cosine to the train-popularity-weighted mean item text (one list for all);
- ``test popularity (oracle)``: the zero-shot items ordered by their test clicks. It reads test: a ceiling
  that says how much of the task is "which new items trend", never a method.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from reclm.cf.evaluator import Evaluator
from reclm.cf.features import load_side_features
from reclm.rundir import RunDir


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def recall_at(scores: np.ndarray, truth: sp.csr_matrix, k: int) -> float:
    top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    hits = np.asarray(truth[np.arange(truth.shape[0])[:, None], top].sum(1)).ravel()
    return float(np.mean(hits / np.asarray(truth.sum(1)).ravel()))


def references(run: Path, k: int) -> dict[str, float]:
    data, split = RunDir(run).load()
    side = load_side_features(data, "text+profiles", run)  # item text and item profiles by item index
    zero = split.zero_shot_items
    pairs = split.zero_shot_test()
    users = np.unique(pairs[:, 0])
    column = np.full(split.n_items, -1)
    column[zero] = np.arange(len(zero))
    truth = sp.csr_matrix((np.ones(len(pairs)), (pairs[:, 0], column[pairs[:, 1]])), (split.n_users, len(zero)))[users]
    history = split.train_matrix()[users]
    text, profiles = unit_rows(side.item_text), unit_rows(side.item_profiles)
    rows = {"random": Evaluator(split, [k]).chance("zero_shot")[f"recall@{k}"]}
    for name, vectors in (("content (item text)", text), ("content (item profiles)", profiles)):
        rows[name] = recall_at(unit_rows(np.asarray(history @ vectors)) @ vectors[zero].T, truth, k)
    counts = np.bincount(split.train[:, 1], minlength=split.n_items).astype(np.float64)
    popular = (counts / counts.sum()) @ text
    rows["like train's popular items"] = recall_at(np.tile(text[zero] @ popular, (len(users), 1)), truth, k)
    clicks = np.bincount(pairs[:, 1], minlength=split.n_items)[zero].astype(np.float64)
    rows["test popularity (oracle)"] = recall_at(np.tile(clicks, (len(users), 1)), truth, k)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    print(f"{args.run}: zero-shot references")
    for name, value in references(args.run, args.k).items():
        print(f"  {name:32s} recall@{args.k} {value:.4f}")


if __name__ == "__main__":
    main()
