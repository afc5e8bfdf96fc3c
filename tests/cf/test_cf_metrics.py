import math

import numpy as np
import pytest
import torch

from reclm.cf.backbones.base import CFModel
from reclm.cf.evaluator import Evaluator
from reclm.cf.metrics import ndcg_at_k, recall_at_k, topk_metrics
from reclm.data.split import Split


def test_recall_and_ndcg_by_hand():
    hits = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    n_rel = torch.tensor([3, 1, 2])
    idcg3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert recall_at_k(hits, n_rel, 5).tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    assert recall_at_k(hits, n_rel, 2).tolist() == pytest.approx([1 / 3, 0.0, 0.0])
    assert ndcg_at_k(hits, n_rel, 5).tolist() == pytest.approx([(1 + 0.5) / idcg3, 0.5, 0.0])
    # IDCG over min(|gt|, K): with K=2 the ideal list has 2 hits
    assert ndcg_at_k(hits, n_rel, 2).tolist() == pytest.approx([1 / (1 + 1 / math.log2(3)), 0.0, 0.0])


def test_metrics_with_k_beyond_the_list_count_missing_ranks_as_misses():
    hits = torch.tensor([[0, 1]], dtype=torch.bool)
    out = topk_metrics(hits, torch.tensor([2]), [1, 2, 5])
    assert out["recall@1"].item() == 0.0
    assert out["recall@5"].item() == pytest.approx(0.5)
    assert out["ndcg@5"].item() == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


class FixedScores(CFModel):
    """A model whose scores are a given matrix (to check the evaluator's masking and ranking)."""

    dot_product = False

    def __init__(self, scores: np.ndarray):
        torch.nn.Module.__init__(self)
        self.n_users, self.n_items = scores.shape
        self.scores = torch.nn.Parameter(torch.as_tensor(scores, dtype=torch.float32), requires_grad=False)

    def scorer(self):
        return lambda users, items=None: self.scores[users] if items is None else self.scores[users][:, items]


def small_split() -> Split:
    # 2 users, 6 items; item 5 is zero-shot
    return Split(
        n_users=2,
        n_items=6,
        train=np.array([[0, 0], [1, 1]]),
        valid=np.array([[0, 1], [1, 2]]),
        test=np.array([[0, 2], [0, 5], [1, 3]]),
        zero_shot_items=np.array([5]),
    )


def test_evaluator_masks_seen_items_and_ranks_by_hand():
    scores = np.array(
        [
            [9.0, 8.0, 1.0, 7.0, 6.0, 0.5],  # user 0: train 0, valid 1 masked for test -> ranks 3, 4, 2
            [0.0, 9.0, 8.0, 1.0, 7.0, 0.1],  # user 1: train 1 (and valid 2 for test) masked -> ranks 4, 3
        ]
    )
    ev = Evaluator(small_split(), [1, 2, 3])
    model = FixedScores(scores)
    valid = ev.evaluate(model, "valid", per_user=True)
    # user 0: train item 0 masked -> item 1 first (hit); user 1: item 1 masked -> item 2 first (hit)
    assert valid.metrics["recall@1"] == pytest.approx(1.0)
    test = ev.evaluate(model, "test", per_user=True)
    # user 0 (truth {2}): ranking 3, 4, 2 -> hit at rank 3; user 1 (truth {3}): ranking 4, 3 -> hit at rank 2
    frame = test.per_user.set_index("user")
    assert frame.loc[0, "recall@2"] == 0.0 and frame.loc[0, "recall@3"] == 1.0
    assert frame.loc[0, "ndcg@3"] == pytest.approx(0.5)
    assert frame.loc[1, "ndcg@2"] == pytest.approx(1 / math.log2(3))
    # the zero-shot item never enters the full-shot ranking even with the top score
    scores[0, 5] = 100.0
    assert ev.evaluate(FixedScores(scores), "test").metrics == test.metrics


def test_zero_shot_ranks_only_zero_shot_items():
    split = small_split()
    split.zero_shot_items = np.array([4, 5])
    split.test = np.array([[0, 2], [0, 5], [1, 3], [1, 4]])
    scores = np.array([[9.0, 8.0, 7.0, 6.0, 1.0, 2.0], [9.0, 8.0, 7.0, 6.0, 3.0, 2.0]])
    ev = Evaluator(split, [1, 2])
    model = FixedScores(scores)
    top = ev.rank(model, "zero_shot", np.array([0, 1]), k=2)
    assert set(top.ravel().tolist()) <= {4, 5}
    assert top.tolist() == [[5, 4], [4, 5]]
    result = ev.evaluate(model, "zero_shot")
    assert result.n_users == 2
    assert result.metrics["recall@1"] == pytest.approx(1.0)  # although six other items score higher


def cold_split() -> Split:
    # 3 users, 8 items; item 7 zero-shot, items 5 and 6 cold-validation (their pairs only in cold_valid)
    return Split(
        n_users=3,
        n_items=8,
        train=np.array([[0, 0], [1, 1], [2, 2]]),
        valid=np.array([[0, 1], [1, 2], [2, 3]]),
        test=np.array([[0, 2], [0, 7], [1, 3], [2, 7]]),
        zero_shot_items=np.array([7]),
        cold_valid_items=np.array([5, 6]),
        cold_valid=np.array([[0, 6], [1, 5], [1, 6]]),
    )


def test_cold_valid_ranks_only_cold_items_against_cold_pairs_and_never_reads_test():
    split = cold_split()
    scores = np.array(
        [
            [9.0, 8.0, 7.0, 6.0, 5.0, 1.0, 2.0, 10.0],  # user 0: cold ranking 6, 5 -> hit at 1
            [9.0, 8.0, 7.0, 6.0, 5.0, 3.0, 1.0, 10.0],  # user 1: cold ranking 5, 6 -> both truths in the top 2
            [9.0, 8.0, 7.0, 6.0, 5.0, 3.0, 1.0, 10.0],  # user 2: no cold pair, not evaluated
        ]
    )
    ev = Evaluator(split, [1, 2])
    model = FixedScores(scores)
    assert ev.rank(model, "cold_valid", np.array([0, 1]), k=2).tolist() == [[6, 5], [5, 6]]
    cold = ev.evaluate(model, "cold_valid", per_user=True)
    assert cold.n_users == 2 and cold.per_user["user"].tolist() == [0, 1]
    frame = cold.per_user.set_index("user")
    assert frame.loc[0, "recall@1"] == 1.0 and frame.loc[1, "recall@1"] == 0.5 and frame.loc[1, "recall@2"] == 1.0
    # cold items never enter the full-shot rankings, though they score above the truth
    scores[:, 5:7] = 50.0
    for task in ("valid", "test"):
        top = ev.rank(FixedScores(scores), task, ev.tasks[task].users, k=3)
        assert not set(top.ravel().tolist()) & {5, 6, 7}
    # any other test set: the cold-validation result is the same
    split.test = np.array([[0, 5], [1, 6], [2, 4], [2, 5], [0, 3]])
    again = Evaluator(split, [1, 2]).evaluate(model, "cold_valid", per_user=True)
    assert again.metrics == cold.metrics and again.per_user.equals(cold.per_user)


def test_rank_all_lists_every_evaluated_user_in_batches():
    split = cold_split()
    scores = np.arange(24, dtype=float).reshape(3, 8)
    ev = Evaluator(split, [1, 2], batch_size=1)
    lists = ev.rank_all(FixedScores(scores), "test", k=3)
    # test users 0 and 1 (user 2's only test item is zero-shot); train + valid masked; 5, 6, 7 not candidates
    assert lists.tolist() == [[4, 3, 2], [4, 3, 0]]


def test_chance_metrics_are_what_random_rankings_score_on_average(tiny_split):
    """The exact expectation of a uniformly random ranking, checked against 150 random scorers."""
    import torch

    from reclm.cf.evaluator import Evaluator

    evaluator = Evaluator(tiny_split, topks=[5, 10])

    class RandomScores:
        def __init__(self, seed: int):
            self.gen = torch.Generator().manual_seed(seed)

        def scorer(self):
            def score(users, items=None):
                width = tiny_split.n_items if items is None else len(items)
                return torch.rand(len(users), width, generator=self.gen)

            return score

        def eval(self):
            return self

        def train(self, mode: bool = True):
            return self

        training = False

    for task in ("test", "zero_shot"):
        expected = evaluator.chance(task)
        draws = [evaluator.evaluate(RandomScores(seed), task).metrics for seed in range(150)]
        for name, value in expected.items():
            simulated = sum(d[name] for d in draws) / len(draws)
            assert abs(simulated - value) < 0.05 * max(value, 0.05), (task, name, simulated, value)
    assert 0 < evaluator.chance("test")["recall@5"] < evaluator.chance("test")["recall@10"] < 1
    assert evaluator.chance("zero_shot")["recall@5"] == 1.0  # 4 zero-shot items: any list of 5 holds them all
