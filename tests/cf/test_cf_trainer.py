import json

import numpy as np
import pandas as pd
import pytest
import torch

from reclm.cf import CFConfig, load_model, train_cf
from reclm.cf.features import SideFeatures
from reclm.data.split import Split


def small_config(**kw) -> CFConfig:
    base = {"dim": 8, "feature_hidden": [16], "batch_size": 64, "epochs": 30, "patience": 3, "topks": [1, 2, 5]}
    return CFConfig(**{**base, **kw})


def test_selection_ignores_test_and_restores_the_best_validation_epoch(tiny_split, make_split):
    cfg = small_config(backbone="bias-mf", lr=0.05, epochs=40, patience=4)
    first = train_cf(tiny_split, cfg, show_progress=False)
    history = first.history
    best = first.best_epoch
    scores = [h["valid"]["ndcg@20"] for h in history]
    assert best == int(np.argmax(scores)) + 1
    assert first.epochs_run < 40 and best < first.epochs_run  # stopped early, after its best epoch
    # the returned model is the best epoch's, not the last one's
    assert first.valid["ndcg@20"] == pytest.approx(scores[best - 1])
    assert first.valid["ndcg@20"] != pytest.approx(scores[-1])

    # same train/valid, a different test set: selection (and everything before test) is unchanged
    other = make_split()
    rng = np.random.default_rng(5)
    other.test = np.array([(u, int(rng.integers(0, 36))) for u in range(60)], dtype=np.int64)
    second = train_cf(other, cfg, show_progress=False)
    assert second.best_epoch == best
    assert second.valid == first.valid
    assert second.test != first.test


def test_training_is_deterministic_given_the_seed(tiny_split, tiny_features):
    cfg = small_config(backbone="simgcl", features="text", epochs=3)
    a = train_cf(tiny_split, cfg, tiny_features, show_progress=False)
    b = train_cf(tiny_split, cfg, tiny_features, show_progress=False)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.test == b.test
    c = train_cf(tiny_split, cfg.model_copy(update={"seed": 7}), tiny_features, show_progress=False)
    assert [h["loss"] for h in c.history] != [h["loss"] for h in a.history]


@pytest.mark.parametrize("backbone", ["bias-mf", "lightgcn"])
def test_text_features_score_unseen_items(backbone, tiny_split, tiny_features):
    """Zero-shot items have no train edge: only their text places them. Chance recall@1 is 1/4."""
    cfg = small_config(backbone=backbone, features="text", lr=0.01, epochs=60, patience=10)
    result = train_cf(tiny_split, cfg, tiny_features, show_progress=False)
    assert result.zero_shot["recall@1"] >= 0.8
    assert result.test["recall@5"] > 0.5


def test_outputs_written_and_model_reloads(tmp_path, tiny_split, tiny_features):
    cfg = small_config(backbone="lightgcn", features="text+profiles", epochs=4)
    result = train_cf(
        tiny_split, cfg, tiny_features, tmp_path, show_progress=False, user_ids=[f"u{i}" for i in range(60)]
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("valid", "test", "zero_shot", "best_epoch", "epoch_seconds", "eval_seconds", "config"):
        assert key in metrics
    assert set(metrics["test"]) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (1, 2, 5, 20)}
    assert all(0.0 <= v <= 1.0 for task in ("valid", "test", "zero_shot") for v in metrics[task].values())
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == result.epochs_run and "valid" in history[0]
    per_user = pd.read_csv(tmp_path / "per_user.csv")
    assert set(per_user["task"]) == {"valid", "test", "zero_shot"}
    assert per_user.loc[per_user.task == "test", "recall@5"].mean() == pytest.approx(metrics["test"]["recall@5"])
    assert per_user["user_id"].str.startswith("u").all()

    emb = np.load(tmp_path / "embeddings.npz")
    model = load_model(tmp_path / "model.pt")
    scores = model.user_item_scores([0, 1])
    assert torch.allclose(torch.as_tensor(emb["users"][[0, 1]] @ emb["items"].T), scores, atol=1e-5)
    assert torch.allclose(result.model.user_item_scores([0, 1]), scores, atol=1e-5)
    # the loaded model still encodes a new item from its text and profile embeddings
    with torch.no_grad():
        new = model.fusion.encode_new_items(torch.as_tensor(tiny_features.item_text[:1]), None)
    assert new.shape == (1, 8)


def test_missing_validation_is_refused(tiny_split):
    tiny_split.valid = np.zeros((0, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="validation"):
        train_cf(tiny_split, small_config(), show_progress=False)


def test_text_mode_without_text_is_refused(tiny_split):
    with pytest.raises(ValueError, match="item text"):
        train_cf(tiny_split, small_config(features="text"), SideFeatures(), show_progress=False)


def interrupt_at(monkeypatch, epoch: int) -> None:
    """Make the trainer's ``epoch``-th epoch raise KeyboardInterrupt, as Ctrl-C or SIGTERM would."""
    from reclm.cf.trainer import Trainer

    original, calls = Trainer.train_epoch, {"n": 0}

    def train_epoch(self):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


@pytest.mark.parametrize("backbone", ["sgl", "ncf"])
def test_an_interrupted_run_resumes_and_ends_as_an_uninterrupted_one(backbone, tmp_path, monkeypatch, tiny_split):
    cfg = small_config(backbone=backbone, epochs=8, patience=20)
    whole = train_cf(tiny_split, cfg, out_dir=tmp_path / "whole", show_progress=False)
    assert not (tmp_path / "whole" / "checkpoint.pt").exists(), "removed once the run is written"

    with monkeypatch.context() as patch:
        interrupt_at(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            train_cf(tiny_split, cfg, out_dir=tmp_path / "cut", show_progress=False, checkpoint_seconds=0)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    resumed = train_cf(tiny_split, cfg, out_dir=tmp_path / "cut", show_progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert [h["valid"] for h in resumed.history] == [h["valid"] for h in whole.history]
    assert resumed.best_epoch == whole.best_epoch and resumed.test == whole.test
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["resumed_from_epoch"] == 4
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()


def test_a_saved_state_of_other_settings_or_data_is_not_resumed(tmp_path, monkeypatch, tiny_split, make_split):
    cfg = small_config(backbone="bias-mf", epochs=6, patience=20)
    with monkeypatch.context() as patch:
        interrupt_at(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            train_cf(tiny_split, cfg, out_dir=tmp_path / "run", show_progress=False, checkpoint_seconds=0)
    other_lr = cfg.model_copy(update={"lr": cfg.lr * 2})
    fresh = train_cf(tiny_split, other_lr, show_progress=False)
    result = train_cf(tiny_split, other_lr, out_dir=tmp_path / "run", show_progress=False)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["resumed_from_epoch"] == 0
    assert [h["loss"] for h in result.history] == [h["loss"] for h in fresh.history]

    with monkeypatch.context() as patch:
        interrupt_at(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            train_cf(tiny_split, cfg, out_dir=tmp_path / "run2", show_progress=False, checkpoint_seconds=0)
    other_data = make_split(seed=3)
    train_cf(other_data, cfg, out_dir=tmp_path / "run2", show_progress=False)
    assert json.loads((tmp_path / "run2" / "metrics.json").read_text())["resumed_from_epoch"] == 0


def test_a_cf_state_saved_with_every_setting_in_its_fingerprint_is_resumed(tmp_path, monkeypatch, tiny_split):
    """Written while ``added_later`` settings were still in resume fingerprints (reclm.cachekeys)."""
    from reclm.cachekeys import every_field

    cfg = small_config(backbone="bias-mf", epochs=6, patience=20)
    whole = train_cf(tiny_split, cfg, show_progress=False)
    with every_field(), monkeypatch.context() as patch:
        interrupt_at(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            train_cf(tiny_split, cfg, out_dir=tmp_path / "run", show_progress=False, checkpoint_seconds=0)
    resumed = train_cf(tiny_split, cfg, out_dir=tmp_path / "run", show_progress=False)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["resumed_from_epoch"] == 3
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]


COLD = np.arange(28, 36)  # two items of each taste group (the zero-shot items are 36-39)


def with_cold_items(split: Split, cold: np.ndarray = COLD, keep_pairs: bool = True) -> Split:
    """``split`` with ``cold`` held out for cold validation: their pairs leave train, valid and test and
    become the cold_valid pairs (or vanish, with ``keep_pairs=False``: same training, no cold task)."""
    parts = [(p[~np.isin(p[:, 1], cold)], p[np.isin(p[:, 1], cold)]) for p in (split.train, split.valid, split.test)]
    moved = np.concatenate([held for _, held in parts])
    return Split(
        split.n_users,
        split.n_items,
        *(kept for kept, _ in parts),
        zero_shot_items=split.zero_shot_items,
        cold_valid_items=np.asarray(cold, dtype=np.int64),
        cold_valid=moved if keep_pairs else np.zeros((0, 2), np.int64),
    )


def cold_config(**kw) -> CFConfig:
    return small_config(**{"backbone": "bias-mf", "features": "text", "lr": 0.01, "epochs": 30, "patience": 3, **kw})


def test_zero_shot_is_also_selected_on_cold_validation_which_reads_no_test_pair(tiny_split, tiny_features):
    split = with_cold_items(tiny_split)
    cfg = cold_config()
    first = train_cf(split, cfg, tiny_features, show_progress=False)
    scores = [h["cold_valid"]["ndcg@20"] for h in first.history]
    best = first.best_epoch_cold
    assert best is not None and first.cold_valid == first.history[best - 1]["cold_valid"]
    assert scores[best - 1] == max(scores[: best + cfg.patience + 1])  # the best until its patience ran out
    assert set(first.zero_shot_cold_selected) == set(first.zero_shot)

    # adversarial test pairs: every user's test items (full-shot and zero-shot) move to another user
    other = with_cold_items(tiny_split)
    other.test = np.stack([(other.test[:, 0] + 7) % other.n_users, other.test[:, 1]], axis=1)
    second = train_cf(other, cfg, tiny_features, show_progress=False)
    assert second.best_epoch_cold == best and second.best_epoch == first.best_epoch
    assert [h["cold_valid"] for h in second.history] == [h["cold_valid"] for h in first.history]
    assert second.zero_shot_cold_selected != first.zero_shot_cold_selected


def test_cold_selection_leaves_the_full_shot_selection_as_it_was(tiny_split, tiny_features):
    """Training never reads validation, so with or without the cold task the full-shot selection is the
    same; the run goes on until the cold selection's patience ran out too."""
    cfg = cold_config()
    with_cold = train_cf(with_cold_items(tiny_split), cfg, tiny_features, show_progress=False)
    without = train_cf(with_cold_items(tiny_split, keep_pairs=False), cfg, tiny_features, show_progress=False)
    assert without.best_epoch_cold is None and without.zero_shot_cold_selected == {} and without.cold_valid == {}
    assert "cold_valid" not in without.history[0]
    assert (with_cold.best_epoch, with_cold.valid, with_cold.test) == (without.best_epoch, without.valid, without.test)
    assert with_cold.zero_shot == without.zero_shot
    n = without.epochs_run
    assert with_cold.epochs_run > n  # the cold selection was still improving when the full-shot one stopped
    assert [h["loss"] for h in with_cold.history[:n]] == [h["loss"] for h in without.history]
    cold_done = with_cold.best_epoch_cold + cfg.patience + 1
    assert with_cold.epochs_run == min(cfg.epochs, max(n, cold_done))


def test_cold_valid_and_zero_shot_items_are_never_negatives(tiny_split, tiny_features):
    from reclm.cf.trainer import Trainer

    split = with_cold_items(tiny_split)
    trainer = Trainer(split, cold_config(), tiny_features, show_progress=False)
    held_out = set(COLD.tolist()) | set(split.zero_shot_items.tolist())
    assert not held_out & set(trainer.sampler.candidates.tolist())
    rng = np.random.default_rng(0)
    negatives = np.concatenate([trainer.sampler.epoch(rng)[2] for _ in range(20)])
    assert len(np.unique(negatives)) == 40 - len(held_out)  # every other item is drawn, these never
    assert not held_out & set(negatives.tolist())


def test_cold_outputs_and_popularity_of_the_top_20_lists(tmp_path, tiny_split, tiny_features):
    from reclm.cf.evaluator import Evaluator

    split = with_cold_items(tiny_split)
    result = train_cf(split, cold_config(epochs=6), tiny_features, tmp_path, show_progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best_epoch_cold"] == result.best_epoch_cold and metrics["cold_valid"] == result.cold_valid
    assert metrics["zero_shot_cold_selected"] == result.zero_shot_cold_selected
    assert metrics["users_evaluated"]["cold_valid"] == len(np.unique(split.cold_valid[:, 0]))
    per_user = pd.read_csv(tmp_path / "per_user.csv")
    assert set(per_user["task"]) == {"valid", "test", "zero_shot", "cold_valid", "zero_shot_cold_selected"}
    rows = per_user[per_user.task == "zero_shot_cold_selected"]
    assert rows["ndcg@20"].mean() == pytest.approx(metrics["zero_shot_cold_selected"]["ndcg@20"])

    # the popularity numbers, recomputed by hand from the saved (full-shot selected) model
    model = load_model(tmp_path / "model.pt")
    evaluator = Evaluator(split, [20])
    users = evaluator.tasks["test"].users
    lists = np.stack([evaluator.rank(model, "test", np.array([u]), 20)[0] for u in users])
    candidates = [i for i in range(40) if i not in set(COLD.tolist()) | set(split.zero_shot_items.tolist())]
    counts = np.bincount(split.train[:, 1], minlength=40)
    popular = sorted(candidates, key=lambda i: (-counts[i], i))[:20]
    share = np.isin(lists, popular).mean()
    assert metrics["popularity"] == pytest.approx(
        {"k": 20, "users": len(users), "popular_share": share, "coverage": len(np.unique(lists)) / len(candidates)}
    )
    assert 0 < metrics["popularity"]["coverage"] <= 1


def test_an_interrupted_cold_run_resumes_with_both_selections(tmp_path, monkeypatch, tiny_split, tiny_features):
    split = with_cold_items(tiny_split)
    cfg = cold_config(epochs=20)
    whole = train_cf(split, cfg, tiny_features, out_dir=tmp_path / "whole", show_progress=False)
    assert whole.best_epoch + cfg.patience + 1 < 13 < whole.epochs_run  # cut after the full-shot selection ended
    with monkeypatch.context() as patch:
        interrupt_at(patch, 13)
        with pytest.raises(KeyboardInterrupt):
            train_cf(split, cfg, tiny_features, out_dir=tmp_path / "cut", show_progress=False, checkpoint_seconds=0)
    resumed = train_cf(split, cfg, tiny_features, out_dir=tmp_path / "cut", show_progress=False)
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["resumed_from_epoch"] == 12
    assert [h.get("cold_valid") for h in resumed.history] == [h.get("cold_valid") for h in whole.history]
    assert (resumed.best_epoch, resumed.best_epoch_cold) == (whole.best_epoch, whole.best_epoch_cold)
    assert resumed.zero_shot_cold_selected == whole.zero_shot_cold_selected and resumed.test == whole.test
