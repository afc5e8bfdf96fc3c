"""Full-ranking evaluation shared by every backbone.

Four tasks come from a split:
- ``valid``: candidates = all items but the zero-shot and cold-validation ones, the user's train items
  masked, truth = valid items;
- ``test`` (full-shot): same candidates, train and valid items masked, truth = full-shot test items;
- ``zero_shot``: candidates = only the zero-shot items, truth = the user's zero-shot test items;
- ``cold_valid``: candidates = only the cold-validation items, truth = the user's cold-validation pairs
  (the zero-shot task's validation: it reads no test pair).
Only users with at least one ground-truth item are evaluated. Users are scored in batches; the
top-K comes from ``torch.topk`` over the (masked) score matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from reclm.cf.backbones.base import CFModel
from reclm.cf.metrics import discounts, topk_metrics
from reclm.data.split import Split

TASKS = ("valid", "test", "zero_shot", "cold_valid")


@dataclass
class EvalTask:
    name: str
    users: np.ndarray  # evaluated users (each has >= 1 truth item)
    truth: sp.csr_matrix  # (n_users, n_items) ground truth
    mask: sp.csr_matrix  # (n_users, n_items) items excluded from the ranking
    candidates: np.ndarray  # bool (n_items,): items that may be ranked

    def __post_init__(self) -> None:
        self.candidate_ids = np.flatnonzero(self.candidates)
        self.column_of = np.full(len(self.candidates), -1, dtype=np.int64)
        self.column_of[self.candidate_ids] = np.arange(len(self.candidate_ids))

    @property
    def n_candidates(self) -> int:
        return len(self.candidate_ids)

    def candidate_entries(self, matrix: sp.csr_matrix, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(batch row, candidate column) of ``matrix``'s entries in rows ``users`` that are candidates."""
        rows, items = csr_rows(matrix, users)
        cols = self.column_of[items]
        keep = cols >= 0
        return rows[keep], cols[keep]


@dataclass
class EvalResult:
    task: str
    metrics: dict[str, float]  # means over evaluated users
    n_users: int
    per_user: pd.DataFrame | None = None


def build_tasks(split: Split) -> dict[str, EvalTask]:
    zero, cold = split.zero_shot_mask, split.cold_valid_mask
    train = split.train_matrix()
    seen = split.matrix(np.concatenate([split.train, split.valid]))

    def task(name: str, pairs: np.ndarray, mask: sp.csr_matrix, candidates: np.ndarray) -> EvalTask:
        truth = split.matrix(pairs)
        users = np.flatnonzero(np.diff(truth.indptr) > 0)
        return EvalTask(name, users, truth, mask, candidates)

    return {
        "valid": task("valid", split.valid, train, ~(zero | cold)),
        "test": task("test", split.full_shot_test(), seen, ~(zero | cold)),
        "zero_shot": task("zero_shot", split.zero_shot_test(), seen, zero),
        "cold_valid": task("cold_valid", split.cold_valid, train, cold),
    }


class Evaluator:
    def __init__(self, split: Split, topks: list[int], batch_size: int = 1024, device: torch.device | str = "cpu"):
        self.tasks = build_tasks(split)
        self.topks = sorted(topks)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.n_items = split.n_items

    def has(self, task: str) -> bool:
        return len(self.tasks[task].users) > 0 and self.tasks[task].n_candidates > 0

    @torch.no_grad()
    def evaluate(self, model: CFModel, task_name: str, per_user: bool = False) -> EvalResult:
        task = self.tasks[task_name]
        if not self.has(task_name):
            return EvalResult(task_name, {}, 0, None)
        was_training = model.training
        model.eval()
        try:
            scorer = model.scorer()
            size = self.batch_size
            parts = [self._batch(scorer, task, task.users[s : s + size]) for s in range(0, len(task.users), size)]
        finally:
            model.train(was_training)
        columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        means = {name: float(values.mean()) for name, values in columns.items() if name != "n_truth"}
        frame = None
        if per_user:
            frame = pd.DataFrame({"task": task_name, "user": task.users, **columns})
        return EvalResult(task_name, means, len(task.users), frame)

    def chance(self, task_name: str) -> dict[str, float]:
        """The expected metrics of a uniformly random ranking on ``task_name`` (exact, no sampling): the
        level a model must beat before its number means anything. A user with ``n`` of the ``N`` items
        it ranks relevant expects ``n / N`` hits at every rank: Recall@K = min(K, N) / N and
        NDCG@K = (n / N) * sum of the first min(K, N) discounts / IDCG@K."""
        task = self.tasks[task_name]
        if not self.has(task_name):
            return {}
        users = task.users
        masked_rows, _ = task.candidate_entries(task.mask, users)
        truth_rows, _ = task.candidate_entries(task.truth, users)
        ranked = task.n_candidates - np.bincount(masked_rows, minlength=len(users))
        relevant = np.bincount(truth_rows, minlength=len(users))
        keep = (ranked > 0) & (relevant > 0)
        ranked, relevant = ranked[keep].astype(np.float64), relevant[keep].astype(np.float64)
        disc = discounts(max(self.topks)).numpy()
        cumulative = np.concatenate([[0.0], np.cumsum(disc)])
        out: dict[str, float] = {}
        for k in self.topks:
            shown = np.minimum(k, ranked).astype(np.int64)
            out[f"recall@{k}"] = float(np.mean(shown / ranked))
            ideal = cumulative[np.minimum(relevant, k).astype(np.int64)]
            out[f"ndcg@{k}"] = float(np.mean(relevant / ranked * cumulative[shown] / ideal))
        return out

    @torch.no_grad()
    def rank(self, model: CFModel, task_name: str, users: np.ndarray, k: int) -> np.ndarray:
        """The top-``k`` items (``(len(users), k)``) that ``task_name`` would rank for ``users``."""
        task = self.tasks[task_name]
        was_training = model.training
        model.eval()
        try:
            top, _ = self._top(model.scorer(), task, np.asarray(users), k)
        finally:
            model.train(was_training)
        return task.candidate_ids[top.cpu().numpy()]

    def rank_all(self, model: CFModel, task_name: str, k: int) -> np.ndarray:
        """The top-``k`` lists of every user ``task_name`` evaluates, scored ``batch_size`` users at a time."""
        users = self.tasks[task_name].users
        size = self.batch_size
        return np.concatenate([self.rank(model, task_name, users[s : s + size], k) for s in range(0, len(users), size)])

    def _top(self, scorer, task: EvalTask, users: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k positions among the task's candidates (after masking) and the candidate score matrix.

        Only candidate items are scored (the zero-shot task scores 1,441 of MIND's 3,827 items)."""
        device = self.device
        users_t = torch.as_tensor(users, device=device)
        if task.n_candidates == self.n_items:
            scores = scorer(users_t).float()
        else:
            scores = scorer(users_t, torch.as_tensor(task.candidate_ids, device=device)).float()
        rows, cols = task.candidate_entries(task.mask, users)
        if len(rows):
            scores[torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)] = -torch.inf
        k = min(k, task.n_candidates)
        return torch.topk(scores, k, dim=1).indices, scores

    def _batch(self, scorer, task: EvalTask, users: np.ndarray) -> dict[str, np.ndarray]:
        device = self.device
        top, scores = self._top(scorer, task, users, max(self.topks))
        truth = torch.zeros_like(scores, dtype=torch.bool)
        t_rows, t_cols = task.candidate_entries(task.truth, users)
        truth[torch.as_tensor(t_rows, device=device), torch.as_tensor(t_cols, device=device)] = True
        hits = truth.gather(1, top)
        n_truth = truth.sum(1)
        values = topk_metrics(hits, n_truth, self.topks)
        out = {name: v.cpu().numpy() for name, v in values.items()}
        out["n_truth"] = n_truth.cpu().numpy()
        return out


def csr_rows(matrix: sp.csr_matrix, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(batch row, column) of every stored entry in ``matrix``'s rows ``users``."""
    sub = matrix[users]
    rows = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
    return rows, sub.indices.astype(np.int64)
