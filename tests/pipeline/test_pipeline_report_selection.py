"""The report's zero-shot columns (selected on full-shot validation and on cold validation), the epoch-cap
flags and the popularity table, from real CF runs written into a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reclm.cf import CFConfig, train_cf
from reclm.cf.features import SideFeatures
from reclm.data.dataset import RecDataset
from reclm.data.split import SplitSpec, make_split
from reclm.pipeline.report import cap_flags, write_report


def clustered_dataset(n_users: int = 48, n_items: int = 60, groups: int = 4, per_user: int = 12) -> RecDataset:
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(n_users):
        pool = np.flatnonzero(np.arange(n_items) % groups == u % groups)
        chosen = rng.choice(pool, size=per_user, replace=False)
        users += [u] * per_user
        items += chosen.tolist()
    ids = [str(i) for i in range(max(n_users, n_items))]
    return RecDataset("clustered", ids[:n_users], ids[:n_items], np.array(users), np.array(items), {})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    data = clustered_dataset()
    split = make_split(data, SplitSpec(method="random", zero_shot_fraction=0.1, cold_valid_fraction=0.1, seed=1))
    split.save(root / "data")
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 8)).astype(np.float32)
    text = centres[np.arange(data.n_items) % 4] + 0.1 * rng.normal(size=(data.n_items, 8)).astype(np.float32)
    profiles = centres[np.arange(data.n_users) % 4] + 0.1 * rng.normal(size=(data.n_users, 8)).astype(np.float32)
    features = SideFeatures(item_text=text, user_profiles=profiles, item_profiles=text)
    for mode in ("text", "text+profiles"):  # the concat fusion: its runs stop at the epochs these tests name
        cfg = CFConfig(
            backbone="bias-mf", features=mode, fusion="concat", dim=8, feature_hidden=[16], lr=0.01, epochs=12,
            patience=2,
        )  # fmt: skip
        train_cf(split, cfg, features, root / "cf" / f"bias-mf-{mode}-s2020", show_progress=False)
    write_report(root)
    return root


def test_report_shows_zero_shot_selected_both_ways(run_dir):
    md = (run_dir / "report" / "report.md").read_text()
    metrics = json.loads((run_dir / "cf" / "bias-mf-text+profiles-s2020" / "metrics.json").read_text())
    assert (metrics["best_epoch"], metrics["best_epoch_cold"]) == (5, 8)  # two epochs, two zero-shot numbers
    assert metrics["zero_shot"]["ndcg@20"] != metrics["zero_shot_cold_selected"]["ndcg@20"]
    tables = {}
    for caption in ("epoch selected on full-shot validation", "epoch selected on cold validation"):
        assert caption in md
        tables[caption] = md[md.index(caption) :].split("\n\n")[1]
    for caption, key in (
        ("epoch selected on full-shot validation", "zero_shot"),
        ("epoch selected on cold validation", "zero_shot_cold_selected"),
    ):
        assert f"| {metrics[key]['ndcg@20']:.4f} |" in tables[caption]
    assert "zero N@20 cold-sel." in md and "cold-sel. epoch" in md
    results = json.loads((run_dir / "report" / "results.json").read_text())
    run = next(r for r in results if r["run"] == "bias-mf-text+profiles-s2020")
    assert run["zero_shot_cold_selected"] == metrics["zero_shot_cold_selected"]
    assert run["best_epoch_cold"] == metrics["best_epoch_cold"]
    assert (run_dir / "report" / "plots" / "cold_validation_curves.png").stat().st_size > 1000
    assert (run_dir / "report" / "plots" / "validation_curves.png").stat().st_size > 1000


def test_report_flags_the_epoch_cap_and_shows_popularity(run_dir):
    md = (run_dir / "report" / "report.md").read_text()
    cap = md[md.index("## Training length") :].split("\n## ")[0]
    assert "1 of 2 runs stopped at the epoch cap" in cap
    assert "| bias-mf-text-s2020 | stopped at the cap; best epoch 12 of 12; cold-selected epoch 12 of 12 |" in cap
    assert "bias-mf-text+profiles-s2020" not in cap  # best epochs 5 and 8, stopped early at 11
    popularity = md[md.index("## Popularity concentration") :].split("\n## ")[0]
    metrics = json.loads((run_dir / "cf" / "bias-mf-text+profiles-s2020" / "metrics.json").read_text())
    share, coverage = metrics["popularity"]["popular_share"], metrics["popularity"]["coverage"]
    assert 0 < share <= 1 and 0 < coverage <= 1
    assert f"| bias-mf | text+profiles | {share:.4f} | {coverage:.4f} | 1 |" in popularity


def test_cap_flags():
    config = {"epochs": 40, "eval_every": 1}
    assert cap_flags({"config": config, "epochs_run": 12, "best_epoch": 6, "best_epoch_cold": 8}) == []
    assert cap_flags({"config": config, "epochs_run": 40, "best_epoch": 20, "best_epoch_cold": 39}) == [
        "stopped at the cap",
        "cold-selected epoch 39 of 40",
    ]
    assert cap_flags({"config": config, "epochs_run": 40, "best_epoch": 38}) == [
        "stopped at the cap",
        "best epoch 38 of 40",
    ]
    assert cap_flags({"config": {"epochs": 40, "eval_every": 5}, "epochs_run": 39, "best_epoch": 35}) == [
        "best epoch 35 of 40"
    ]


def test_every_results_table_ends_with_the_random_ranking_level(run_dir):
    """The level a random ranking reaches on this split, so a zero-shot number can be read against chance."""
    from reclm.cf.evaluator import Evaluator
    from reclm.data.split import Split

    evaluator = Evaluator(Split.load(run_dir / "data"), [20, 40])
    md = (run_dir / "report" / "report.md").read_text()
    for caption, task in (("*full-shot test (", "test"), ("*zero-shot test, epoch selected on full-shot", "zero_shot")):
        table = md[md.index(caption) :].split("\n\n")[1]
        last = [cell.strip() for cell in table.strip().splitlines()[-1].strip("|").split("|")]
        assert last[0] == "random ranking"
        assert float(last[1]) == pytest.approx(evaluator.chance(task)["recall@20"], abs=1e-4)
        assert 0 < float(last[1]) <= 1
