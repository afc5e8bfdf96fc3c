"""The serving pieces on the tiny run's real trained models: representations of known and new users and items,
exact top-k (NumPy and FAISS), the micro-batching queue, model selection."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from reclm.cf.trainer import load_model
from reclm.rundir import RunDir
from reclm.serve.index import GrowingMatrix, ItemIndex, top_from_scores
from reclm.serve.profiles import MicroBatcher, QueueFull
from reclm.serve.reps import ServingModel
from reclm.serve.runinfo import choose_model, find_adapter, run_settings

BACKBONES = ("lightgcn", "ncf", "bias-mf")


def serving(run_root, split, backbone: str) -> tuple[ServingModel, torch.nn.Module]:
    model = load_model(run_root / "cf" / f"{backbone}-text+profiles-s2020" / "model.pt")
    return ServingModel(model, split.train, split.n_users, split.n_items), model


@pytest.mark.parametrize("backbone", BACKBONES)
def test_known_users_score_as_the_model(served_run, backbone):
    root, info = served_run
    split = info["split"]
    serve, model = serving(root, split, backbone)
    users = np.arange(split.n_users)
    expected = model.user_item_scores(users).numpy()
    if serve.dot_product:
        got = serve.users_final @ serve.items_final.T
    else:
        got = np.stack([serve.ncf_scores(serve.users_final[u], serve.items_final) for u in users])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_new_items_from_their_text_equal_the_trained_zero_shot_items(served_run, backbone):
    """An item rebuilt from its text and profile embeddings gets the model's own final representation: exactly
    for zero-shot items (no train edges, like any new item), for every item when the backbone has no graph."""
    root, info = served_run
    split = info["split"]
    serve, model = serving(root, split, backbone)
    with torch.no_grad():  # the profile rows the model read, the "no profile" vector where an item has none
        text, profiles = model.fusion.item_text.numpy(), model.fusion.item_profile().numpy()
    items0, final = serve.new_items(text, profiles)
    np.testing.assert_allclose(items0, serve.items0, rtol=1e-5, atol=1e-6)
    rows = split.zero_shot_items if serve.kind == "graph" else np.arange(split.n_items)
    assert len(split.zero_shot_items) > 0
    np.testing.assert_allclose(final[rows], serve.items_final[rows], rtol=1e-5, atol=1e-6)
    if serve.kind == "graph":  # seen items do get more than layer 0 from the graph
        seen = np.setdiff1d(np.arange(split.n_items), split.zero_shot_items)
        assert not np.allclose(final[seen], serve.items_final[seen], atol=1e-3)


def test_graph_item_layers_are_the_trained_propagation(served_run):
    from reclm.cf.graph import propagate

    root, info = served_run
    serve, model = serving(root, info["split"], "lightgcn")
    assert model.config.fusion == "local"  # the default: the graph propagates the text model's layer 0
    with torch.no_grad():
        users0, items0 = model.fusion.all()
        text_items = model.fusion.text_mlp(model.fusion.item_text)
        layers = [torch.cat([model.fusion.user_id.weight, text_items])]
        for _ in range(model.config.layers):
            layers.append(propagate(model.adjacency, layers[-1]))
    assert len(serve.item_layers) == model.config.layers >= 1
    for k, layer in enumerate(serve.item_layers):
        np.testing.assert_allclose(layer, layers[k][model.n_users :].numpy(), rtol=1e-5, atol=1e-6)
    total = torch.stack(layers[1:]).sum(0)[model.n_users :] + items0  # layer 0 with the corrections
    mean = (total / (model.config.layers + 1)).numpy()
    np.testing.assert_allclose(mean, serve.items_final, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_new_user_gets_items_of_its_history_genre(served_run, backbone):
    """Users known only by five train items of one genre (no profile) get mostly that genre in their top-5."""
    root, info = served_run
    data, split = info["data"], info["split"]
    serve, _ = serving(root, split, backbone)
    genres = np.array(data.item_fields["genres"])
    seen = np.unique(split.train[:, 1])
    shares = []
    for genre in np.unique(genres):
        history = [i for i in seen if genres[i] == genre][:5]
        user = serve.new_users([np.array(history)], serve.items0)[0]
        scores = serve.items_final @ user if serve.dot_product else serve.ncf_scores(user, serve.items_final)
        top, _ = top_from_scores(scores, 5, np.array(history))
        shares.append(np.mean(genres[top] == genre))
    assert np.mean(shares) >= 0.6, shares


def test_fold_in_equals_propagation_for_a_lone_new_user(served_run):
    """The folded-in LightGCN user: layer 0 from the ID embeddings of the trained users who share its items
    (weighted by how many), then the history items' layers weighted 1/sqrt(|H| (d_i + 1))."""
    root, info = served_run
    split = info["split"]
    serve, model = serving(root, split, "lightgcn")
    history = np.array([0, 4, 8])
    got = serve.new_users([history], serve.items0)[0]
    train = split.train_matrix().toarray()
    shared = train[:, history].sum(1)  # items each trained user shares with the history
    id_part = (shared[:, None] * model.fusion.user_id.weight.detach().numpy()).sum(0) / shared.sum()
    with torch.no_grad():
        u0 = model.fusion.encode_new_users(torch.from_numpy(id_part[None].astype(np.float32)), None).numpy()[0]
    weights = 1.0 / np.sqrt(len(history) * (serve.item_degree[history] + 1.0))
    layers = [u0] + [(weights[:, None] * layer[history]).sum(0) for layer in serve.item_layers]
    np.testing.assert_allclose(got, np.mean(layers, axis=0), rtol=1e-5, atol=1e-6)


def test_item_index_faiss_equals_numpy_with_exclusions_and_appended_rows():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((500, 16)).astype(np.float32)
    numpy_side, faiss_side = GrowingMatrix(base), GrowingMatrix(base)
    exact = ItemIndex(numpy_side, min_items=10**9)
    fast = ItemIndex(faiss_side, min_items=100, max_tail=50)
    assert (exact.backend, fast.backend) == ("numpy", "faiss")
    extra = rng.standard_normal((80, 16)).astype(np.float32) * 3  # large norms: they win top-k spots
    for start in range(0, 80, 20):  # tail rows, then a rebuild once the tail passes 50 rows
        for side in (numpy_side, faiss_side):
            side.append(extra[start : start + 20])
        fast.refresh()
        for _ in range(5):
            query = rng.standard_normal(16).astype(np.float32)
            exclude = rng.choice(len(numpy_side), 30, replace=False)
            a_idx, a_scores = exact.search(query, 25, exclude)
            b_idx, b_scores = fast.search(query, 25, exclude)
            np.testing.assert_allclose(a_scores, b_scores, rtol=1e-4, atol=1e-4)
            assert set(a_idx) == set(b_idx) and not set(a_idx) & set(exclude.tolist())
            full = numpy_side.view() @ query
            full[exclude] = -np.inf
            assert np.allclose(a_scores, np.sort(full)[::-1][:25], atol=1e-5)
    assert len(faiss_side) == 580 and fast._faiss[1] > 500  # rebuilt over appended rows


def test_growing_matrix_views_stay_consistent_while_appending():
    matrix = GrowingMatrix(np.zeros((3, 2), np.float32))
    view = matrix.view()
    for k in range(100):  # several buffer growths
        matrix.append(np.full((1, 2), k + 1, np.float32))
    assert view.shape == (3, 2) and np.all(view == 0)
    assert len(matrix) == 103 and matrix.view()[-1, 0] == 100 and matrix.view()[3, 0] == 1


def test_micro_batcher_batches_waiting_jobs_and_keeps_order():
    started = threading.Event()
    release = threading.Event()
    sizes = []

    def run(jobs):
        sizes.append(len(jobs))
        started.set()
        release.wait(10)
        return [j * 10 for j in jobs]

    batcher = MicroBatcher(run, max_batch=8, max_wait=0.0, max_pending=100)
    try:
        first = batcher.submit(0)
        assert started.wait(10)
        futures = [batcher.submit(j) for j in range(1, 13)]  # queue up while the first batch runs
        release.set()
        assert first.result(10) == 0
        assert [f.result(10) for f in futures] == [j * 10 for j in range(1, 13)]
        assert sizes == [1, 8, 4]
        assert batcher.stats()["largest_batch"] == 8 and batcher.stats()["pending"] == 0
    finally:
        batcher.close()


def test_micro_batcher_reports_errors_to_every_job_and_bounds_its_queue():
    gate = threading.Event()

    def run(jobs):
        gate.wait(10)
        if any(j == "bad" for j in jobs):
            raise ValueError("boom")
        return jobs

    batcher = MicroBatcher(run, max_batch=4, max_wait=0.05, max_pending=3)
    try:
        futures = [batcher.submit("ok"), batcher.submit("bad"), batcher.submit("ok")]
        with pytest.raises(QueueFull):
            batcher.submit("one too many")
        gate.set()
        for future in futures:
            with pytest.raises(ValueError, match="boom"):
                future.result(10)
        time.sleep(0.05)
        assert batcher.submit("fine").result(10) == "fine"  # the worker lives on
    finally:
        batcher.close()


def test_choose_model_by_validation_among_text_profiles_runs(served_run):
    root, info = served_run
    run = RunDir(root)
    with_profiles = {k: r for k, r in info["results"].items() if k.endswith("text+profiles")}
    best = max(with_profiles, key=lambda k: with_profiles[k].valid["ndcg@20"])
    assert choose_model(run).name == f"{best}-s2020"
    assert choose_model(run, metric="recall@10").features == "text+profiles"
    assert choose_model(run, "cf/lightgcn-text-s2020").features == "text"
    assert choose_model(run, "lightgcn-text-s2020").name == "lightgcn-text-s2020"
    with pytest.raises(FileNotFoundError, match="available: cf/"):
        choose_model(run, "cf/nope")
    assert find_adapter(run, "user") == info["adapter"] == find_adapter(run, "item")
    settings = run_settings(run)
    assert settings.params.max_new_tokens == 12 and settings.budget.max_words == 20
    assert settings.encoder == "all-MiniLM-L6-v2" and settings.base_model.endswith("model")


def test_serve_command_reports_bad_input_in_one_line(tmp_path, served_run):
    from typer.testing import CliRunner

    from reclm.cli.main import app

    runner = CliRunner()
    missing = runner.invoke(app, ["serve", str(tmp_path / "no-run")])
    assert missing.exit_code == 2 and "not a prepared run directory" in missing.output
    root, _ = served_run
    backend = runner.invoke(app, ["serve", str(root), "--profile-backend", "gpt"])
    assert backend.exit_code == 2 and "--profile-backend 'gpt'" in backend.output
    model = runner.invoke(app, ["serve", str(root), "--model", "cf/missing"])
    assert model.exit_code == 2 and "available: cf/" in model.output
