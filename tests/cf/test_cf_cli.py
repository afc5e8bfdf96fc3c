"""The real ``reclm train-cf`` command on a small slice of the real MovieLens-100K files."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.data.loaders import ml100k_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def ml_slice(tmp_path_factory):
    """Users 1-100 and movies 1-300 of ml-100k as RecBole atomic files (with the .item text)."""
    folder = tmp_path_factory.mktemp("ml-slice")
    source = ml100k_folder()
    inter = pd.read_csv(source / "ml-100k.inter", sep="\t", dtype=str)
    keep = (inter["user_id:token"].astype(int) <= 100) & (inter["item_id:token"].astype(int) <= 300)
    inter[keep].to_csv(folder / "mlslice.inter", sep="\t", index=False)
    items = pd.read_csv(source / "ml-100k.item", sep="\t", dtype=str)
    items[items["item_id:token"].isin(set(inter.loc[keep, "item_id:token"]))].to_csv(
        folder / "mlslice.item", sep="\t", index=False
    )
    return folder


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def check_metrics(out):
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("valid", "test", "zero_shot", "best_epoch", "epoch_seconds"):
        assert key in metrics
    for task in ("valid", "test", "zero_shot"):
        assert {"recall@20", "ndcg@20", "recall@40"} <= set(metrics[task])
        assert all(0.0 <= v <= 1.0 for v in metrics[task].values())
    assert metrics["test"]["recall@40"] >= metrics["test"]["recall@20"] >= metrics["test"]["recall@10"]
    per_user = pd.read_csv(out / "per_user.csv")
    assert (per_user["recall@40"] >= per_user["recall@20"]).all()
    assert metrics["best_epoch"] >= 1 and metrics["epoch_seconds"] > 0
    return metrics


def test_train_cf_lightgcn_end_to_end(ml_slice, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "train-cf", "--dataset", ml_slice, "--backbone", "lightgcn", "--features", "none",
        "--epochs", 15, "--zero-shot", 0.1, "--threads", 1, "--quiet", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Recall@20" in result.output and "zero-shot" in result.output
    metrics = check_metrics(out)
    assert metrics["test"]["recall@20"] > 2 * random_recall(out / "split", 20)
    assert metrics["users_evaluated"]["zero_shot"] > 0
    assert (out / "split" / "split.npz").is_file() and (out / "embeddings.npz").is_file()


@pytest.mark.slow
def test_train_cf_text_mode_with_the_packaged_encoder(ml_slice, tmp_path, monkeypatch):
    monkeypatch.setenv("RECLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "text"
    result = invoke(
        "train-cf", "--dataset", ml_slice, "--backbone", "bias-mf", "--features", "text",
        "--epochs", 5, "--threads", 1, "--quiet", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = check_metrics(out)
    assert metrics["feature_coverage"]["item_text"] == 1.0
    assert metrics["config"]["features"] == "text"


def test_train_cf_from_a_prepared_run_with_profiles(ml_slice, tmp_path):
    run = tmp_path / "RUN"
    assert invoke("prepare", "--dataset", ml_slice, "--out", run, "--zero-shot", 0.1).exit_code == 0
    ids = pd.read_csv(ml_slice / "mlslice.inter", sep="\t", dtype=str)
    rng = np.random.default_rng(0)
    (run / "embeddings").mkdir()
    users = sorted(set(ids["user_id:token"]))[:80]  # 80% coverage
    items = sorted(set(ids["item_id:token"]))
    np.savez(run / "embeddings" / "users.npz", ids=np.array(users), vectors=rng.normal(size=(80, 6)).astype("f4"))
    np.savez(
        run / "embeddings" / "items.npz", ids=np.array(items), vectors=rng.normal(size=(len(items), 6)).astype("f4")
    )

    class Encoder:  # no model download inside this test: the text path is covered by the slow test above
        def encode(self, texts, desc=""):
            return np.array([[len(t) / 100.0, t.count(",")] for t in texts], dtype=np.float32)

    import reclm.cf.features as features_module

    original = features_module.item_text_embeddings
    features_module.item_text_embeddings = lambda data, encoder=None: original(data, Encoder())
    try:
        result = invoke("train-cf", "--run", run, "--backbone", "sgl", "--features", "text+profiles",
                        "--epochs", 3, "--threads", 1, "--quiet")  # fmt: skip
        text = invoke("train-cf", "--run", run, "--backbone", "sgl", "--features", "text", "--epochs", 3,
                      "--threads", 1, "--quiet")  # fmt: skip
        warm = invoke("train-cf", "--run", run, "--backbone", "sgl", "--features", "text+profiles", "--epochs", 2,
                      "--threads", 1, "--quiet", "--text-run", run / "cf" / "sgl-text-s2020",
                      "--out", run / "cf" / "warm")  # fmt: skip
    finally:
        features_module.item_text_embeddings = original
    assert result.exit_code == 0, result.output
    out = run / "cf" / "sgl-text+profiles-s2020"
    metrics = check_metrics(out)
    assert metrics["feature_coverage"]["user_profiles"] == pytest.approx(0.8)
    assert metrics["split_source"] == str(run / "data")
    assert text.exit_code == 0 and warm.exit_code == 0, text.output + warm.output
    start = json.loads((run / "cf" / "warm" / "history.json").read_text())[0]
    text_metrics = json.loads((run / "cf" / "sgl-text-s2020" / "metrics.json").read_text())
    assert start["epoch"] == 0 and start["valid"] == pytest.approx(text_metrics["valid"], abs=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backbone", "gcn"], "--backbone 'gcn'"),
        (["--features", "text+profiles"], "--profiles"),
        (["--dataset", "/no/such/dir"], "/no/such/dir"),
        (["--lr", "-1"], "lr"),
        (["--topks", "ten"], "--topks"),
        (["--text-run", "/no/such/run"], "--text-run /no/such/run"),
        (["--from-text", "later"], "--from-text 'later'"),
        (["--dataset", "/no/[red]such[/red]/[/x]dir"], "/no/[red]such[/red]/[/x]dir"),  # printed as given
    ],
)
def test_bad_input_gives_one_error_line_and_exit_2(args, message, ml_slice, tmp_path):
    base = ["--dataset", ml_slice] if "--dataset" not in args else []
    result = invoke("train-cf", *base, *args, "--epochs", 1, "--out", tmp_path / "x")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def random_recall(split_dir, k: int) -> float:
    """Expected full-shot test Recall@k of a random ranking on the saved split: per user, k over the
    candidates left after masking (capped at 1), averaged over the evaluated users."""
    from reclm.cf.evaluator import build_tasks
    from reclm.data.split import Split

    task = build_tasks(Split.load(split_dir))["test"]
    masked = np.asarray(task.mask[task.users][:, task.candidate_ids].sum(axis=1)).ravel()
    return float(np.minimum(1.0, k / (task.n_candidates - masked)).mean())
