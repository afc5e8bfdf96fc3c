"""Fusion strategies: the learned "no profile" vector, profile dropout, the ``paper`` towers (normalised,
items not propagated) and the one-side ablation modes."""

import numpy as np
import pytest
import torch

from reclm.cf import train_cf
from reclm.cf.backbones import BACKBONE_CLASSES, build_model
from reclm.cf.config import CFConfig
from reclm.cf.features import SideFeatures
from reclm.cf.fusion import FUSIONS


def make(backbone, mode, split, features, fusion="concat", **kw):
    torch.manual_seed(0)
    cfg = CFConfig(
        backbone=backbone, features=mode, fusion=fusion, dim=8, feature_hidden=[16], ncf_mlp=[16, 8], **kw
    )  # fmt: skip
    model = build_model(cfg, split.n_users, split.n_items, split.train, features)
    model.start_epoch(np.random.default_rng(0))
    return model


def with_missing(features: SideFeatures, users: list[int], items: list[int]) -> SideFeatures:
    """``features`` where the listed ids have no profile (zero rows, not present)."""
    user_profiles, item_profiles = features.user_profiles.copy(), features.item_profiles.copy()
    user_present = np.ones(len(user_profiles), bool)
    item_present = np.ones(len(item_profiles), bool)
    user_profiles[users], item_profiles[items] = 0.0, 0.0
    user_present[users], item_present[items] = False, False
    return SideFeatures(features.item_text, user_profiles, item_profiles, user_present, item_present)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_missing_profile_is_the_learned_vector_not_zeros(fusion, tiny_split, tiny_features):
    features = with_missing(tiny_features, users=[1, 4], items=[2, 3])
    model = make("lightgcn", "text+profiles", tiny_split, features, fusion=fusion)
    profile = model.fusion.user_profile
    rows = profile()
    assert torch.equal(rows[1], profile.missing.detach()) and torch.equal(rows[4], profile.missing.detach())
    assert torch.equal(rows[0], torch.as_tensor(tiny_features.user_profiles[0]))
    # it starts as the mean of the present profiles, not as a zero row
    present = np.delete(tiny_features.user_profiles, [1, 4], axis=0)
    assert np.allclose(profile.missing.detach().numpy(), present.mean(axis=0), atol=1e-6)
    # and it is trained: the ranking loss reaches it (after one step: the residual branches start at zero)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model.batch_loss(torch.tensor([1, 4]), torch.tensor([2, 0]), torch.tensor([5, 3]))["total"].backward()
        optimizer.step()
    assert profile.missing.grad is not None and profile.missing.grad.abs().sum() > 0
    assert model.fusion.item_profile.missing.grad.abs().sum() > 0


def test_a_new_item_without_a_profile_gets_the_missing_vector(tiny_split, tiny_features):
    model = make("lightgcn", "text+profiles", tiny_split, tiny_features)
    text = torch.as_tensor(tiny_features.item_text[:3])
    missing = model.fusion.item_profile.missing.detach().expand(3, -1)
    assert torch.allclose(model.fusion.encode_new_items(text), model.fusion.encode_new_items(text, missing))
    assert not torch.allclose(model.fusion.encode_new_items(text), model.fusion.encode_new_items(text, 0 * missing))


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_profile_dropout_changes_training_inputs_only(fusion, tiny_split, tiny_features):
    plain = make("bias-mf", "text+profiles", tiny_split, tiny_features, fusion=fusion)
    dropped = make("bias-mf", "text+profiles", tiny_split, tiny_features, fusion=fusion, profile_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain.fusion.users(), dropped.fusion.users())
        assert torch.equal(plain.fusion.items(), dropped.fusion.items())
    dropped.train()
    torch.manual_seed(3)
    rows = dropped.fusion.user_profile()
    replaced = (rows == dropped.fusion.user_profile.missing).all(dim=1)
    assert 0.2 < replaced.float().mean() < 0.8  # about half, redrawn per call
    kept = ~replaced
    assert torch.equal(rows[kept], torch.as_tensor(tiny_features.user_profiles)[kept])


@pytest.mark.parametrize("backbone", ["lightgcn", "sgl", "simgcl"])
def test_paper_fusion_normalises_and_does_not_propagate_items(backbone, tiny_split, tiny_features, make_split):
    model = make(backbone, "text+profiles", tiny_split, tiny_features, fusion="paper")
    users, items = model.final_embeddings()
    with torch.no_grad():
        items0 = model.fusion.items()
    assert torch.allclose(items.norm(dim=1), torch.ones(tiny_split.n_items), atol=1e-5)
    assert torch.allclose(items, items0)
    # another train graph changes users, never items
    other = make_split(seed=5)
    rebuilt = make(backbone, "text+profiles", other, tiny_features, fusion="paper")
    rebuilt.load_state_dict(model.state_dict())
    users2, items2 = rebuilt.final_embeddings()
    assert torch.allclose(items, items2) and not torch.allclose(users, users2)
    # the concat fusion propagates items: trained items carry their users
    concat_items = make(backbone, "text+profiles", tiny_split, tiny_features).final_embeddings()[1]
    with torch.no_grad():
        concat_items0 = make(backbone, "text+profiles", tiny_split, tiny_features).fusion.items()
    assert not torch.allclose(concat_items, concat_items0)


def test_paper_fusion_shares_one_profile_mlp_and_merge(tiny_split, tiny_features):
    model = make("lightgcn", "text+profiles", tiny_split, tiny_features, fusion="paper")
    names = {name for name, _ in model.named_parameters()}
    assert "fusion.profile_mlp.0.weight" in names and "fusion.merge.weight" in names
    assert not any("user_profile_mlp" in n or "item_merge" in n for n in names)
    with torch.no_grad():
        assert torch.allclose(model.fusion.items().norm(dim=1), torch.ones(tiny_split.n_items), atol=1e-5)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
@pytest.mark.parametrize("mode", ["text+user-profiles", "text+item-profiles"])
@pytest.mark.parametrize("backbone", sorted(BACKBONE_CLASSES))
def test_one_side_ablation_modes_read_only_that_side(backbone, mode, fusion, tiny_split, tiny_features):
    side = "user" if mode == "text+user-profiles" else "item"
    other = "item" if side == "user" else "user"
    features = SideFeatures(item_text=tiny_features.item_text)
    setattr(features, f"{side}_profiles", getattr(tiny_features, f"{side}_profiles"))
    model = make(backbone, mode, tiny_split, features, fusion=fusion)
    assert getattr(model.fusion, f"{side}_profile") is not None
    assert getattr(model.fusion, f"{other}_profile") is None
    terms = model.batch_loss(torch.tensor([0, 1, 2]), torch.as_tensor(tiny_split.train[:3, 1]), torch.tensor([5, 6, 7]))
    terms["total"].backward()
    grad = getattr(model.fusion, f"{side}_profile").missing.grad
    mlp = model.fusion.profile_mlp if fusion == "paper" else getattr(model.fusion, f"{side}_profile_mlp")
    assert mlp[-1].weight.grad.abs().sum() > 0
    assert grad is not None  # the missing vector sits in the graph even when every profile is present
    scores = model.user_item_scores([0, 5])
    assert scores.shape == (2, tiny_split.n_items) and torch.isfinite(scores).all()


def test_residual_fusion_starts_as_the_text_model(tiny_split, tiny_features):
    text = make("lightgcn", "text", tiny_split, tiny_features)
    residual = make("lightgcn", "text+profiles", tiny_split, tiny_features, fusion="residual")
    residual.load_state_dict(text.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.allclose(text.fusion.users(), residual.fusion.users())
        assert torch.allclose(text.fusion.items(), residual.fusion.items())


def test_paper_fusion_rejects_profile_sizes_it_cannot_share(tiny_split, tiny_features):
    features = SideFeatures(tiny_features.item_text, tiny_features.user_profiles, tiny_features.item_profiles[:, :5])
    with pytest.raises(ValueError, match="shares one profile MLP"):
        make("lightgcn", "text+profiles", tiny_split, features, fusion="paper")


def test_the_config_names_every_registered_fusion():
    from reclm.cf.config import FUSION_NAMES

    assert tuple(sorted(FUSIONS)) == tuple(sorted(FUSION_NAMES))


@pytest.mark.parametrize("correcting", ["residual", "local"])
@pytest.mark.parametrize("backbone", sorted(BACKBONE_CLASSES))
def test_uninformative_profiles_cost_nothing_with_the_residual_fusion(backbone, correcting, make_split, make_features):
    """All profiles missing, or all the same vector: the residual and local fusions train the `text` model step
    for step, so every metric (zero-shot included) equals the `text` run's with the same seed."""
    split = make_split(n_users=80, n_items=48, zero_shot=8, per_user=10)
    features = make_features(split)
    rng = np.random.default_rng(9)
    text = (features.item_text + 0.8 * rng.normal(size=features.item_text.shape)).astype(np.float32)
    zeros_u, zeros_i = np.zeros_like(features.user_profiles), np.zeros_like(features.item_profiles)
    inputs = {
        "missing": SideFeatures(text, zeros_u, zeros_i, np.zeros(len(zeros_u), bool), np.zeros(len(zeros_i), bool)),
        "zero": SideFeatures(text, zeros_u, zeros_i),
    }

    def run(mode, side, fusion="residual"):
        config = CFConfig(
            backbone=backbone, features=mode, fusion=fusion, dim=8, feature_hidden=[16], ncf_mlp=[16, 8],
            epochs=8, patience=8, batch_size=128, topks=[2, 5], valid_metric="ndcg@5", threads=1,
        )  # fmt: skip
        return train_cf(split, config, side, show_progress=False)

    base = run("text", SideFeatures(item_text=text), correcting)
    for name, side in inputs.items():
        result = run("text+profiles", side, correcting)
        for task in ("valid", "test", "zero_shot"):
            got, want = getattr(result, task), getattr(base, task)
            assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-6 for k in want), (name, task)
    # the concat fusion is not the text model even when its profile branch knows nothing
    concat = run("text+profiles", inputs["missing"], fusion="concat")
    assert any(abs(concat.valid[k] - base.valid[k]) > 1e-6 for k in base.valid)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_an_item_encoded_alone_equals_its_row_of_the_full_pass(fusion, tiny_split, tiny_features):
    """Serving encodes new items one by one: the residual fusion centres them by the catalogue's mean."""
    model = make("lightgcn", "text+profiles", tiny_split, with_missing(tiny_features, [], [3]), fusion=fusion)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # move the zero-started branches off zero
    model.batch_loss(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([5, 6]))["total"].backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        items, users = model.fusion.items(), model.fusion.users()
        for i in (0, 3):
            text = torch.as_tensor(tiny_features.item_text[i : i + 1])
            profile = None if i == 3 else torch.as_tensor(tiny_features.item_profiles[i : i + 1])
            assert torch.allclose(model.fusion.encode_new_items(text, profile)[0], items[i], atol=1e-5)
        ids = model.fusion.user_id.weight[2:3]
        profile = torch.as_tensor(tiny_features.user_profiles[2:3])
        assert torch.allclose(model.fusion.encode_new_users(ids, profile)[0], users[2], atol=1e-5)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_a_batch_reads_the_rows_of_the_full_pass(fusion, tiny_split, tiny_features):
    """BiasMF and NCF read users(index) / items(pos) / items(neg): each row must be what the full pass
    (used for ranking) gives it, whichever other rows share the batch."""
    model = make("bias-mf", "text+profiles", tiny_split, tiny_features, fusion=fusion)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # move the zero-started branches off zero
    model.batch_loss(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([5, 6]))["total"].backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        for index in (torch.tensor([0, 0, 1]), torch.tensor([7, 3])):
            assert torch.allclose(model.fusion.items(index), model.fusion.items()[index], atol=1e-6)
            assert torch.allclose(model.fusion.users(index), model.fusion.users()[index], atol=1e-6)


def test_a_batch_trains_the_residual_branch_as_the_full_pass_does(tiny_split, tiny_features):
    """The index path centres with the full mean and its gradient: a batch's gradients equal those of the
    same rows read from the full pass (a detached mean let the MLP grow where the centring hides it)."""
    features = with_missing(tiny_features, users=[3, 9], items=[4])
    model = make("bias-mf", "text+profiles", tiny_split, features, fusion="residual")
    for layer in (model.fusion.user_profile_mlp[-1], model.fusion.item_profile_mlp[-1]):
        torch.nn.init.normal_(layer.weight, std=0.3)  # off the zero start, so every layer gets a gradient
    model.eval()
    index = torch.tensor([0, 3, 3, 7, 11])
    weights = torch.randn(len(index), model.fusion.out_dim, generator=torch.Generator().manual_seed(0))
    grads = []
    for read in (lambda f: f.users(index) + f.items(index), lambda f: f.users()[index] + f.items()[index]):
        model.zero_grad()
        (read(model.fusion) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[1]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


@pytest.mark.parametrize("backbone", ["bias-mf", "lightgcn"])
def test_profiles_that_encode_taste_lift_new_items_and_shuffled_ones_do_not(backbone, make_split, make_features):
    """Item text says nothing, profiles say each user's and item's taste group: `text+profiles` must rank
    zero-shot items far above `text`, and the same profiles permuted over ids must lose that gain."""
    split = make_split(n_users=80, n_items=48, zero_shot=8, per_user=10)
    features = make_features(split)
    rng = np.random.default_rng(5)
    noise_text = rng.normal(size=features.item_text.shape).astype(np.float32)
    real = SideFeatures(noise_text, features.user_profiles, features.item_profiles)
    shuffled = SideFeatures(
        noise_text,
        features.user_profiles[rng.permutation(split.n_users)],
        features.item_profiles[rng.permutation(split.n_items)],
    )

    def zero_shot_recall(mode: str, side: SideFeatures) -> float:
        config = CFConfig(
            backbone=backbone, features=mode, dim=8, feature_hidden=[16], epochs=30, patience=30, lr=0.01,
            batch_size=128, topks=[5], valid_metric="ndcg@5", threads=1,
        )  # fmt: skip
        return train_cf(split, config, side, show_progress=False).zero_shot["recall@5"]

    text = zero_shot_recall("text", SideFeatures(item_text=noise_text))
    with_profiles = zero_shot_recall("text+profiles", real)
    without_signal = zero_shot_recall("text+profiles", shuffled)
    assert with_profiles > text + 0.3, (text, with_profiles)
    assert with_profiles > without_signal + 0.3, (without_signal, with_profiles)


@pytest.mark.parametrize("backbone", ["bias-mf", "ncf", "lightgcn"])
def test_a_batch_runs_each_profile_mlp_once_over_the_distinct_profiles(backbone, tiny_split, tiny_features):
    """The residual branch costs one MLP pass over a side's distinct profiles (plus the missing vector) per
    batch, however many rows the batch reads: profiles repeat, and BiasMF / NCF read positives and
    negatives (before: two passes per read, one for the rows and one for the mean)."""
    users = tiny_features.user_profiles.copy()
    users[1::2] = users[0]  # half the users share one profile
    features = with_missing(SideFeatures(tiny_features.item_text, users, tiny_features.item_profiles), [2], [])
    model = make(backbone, "text+profiles", tiny_split, features, fusion="residual")
    seen: dict[str, list[int]] = {"user": [], "item": []}
    for side in seen:
        mlp = getattr(model.fusion, f"{side}_profile_mlp")
        mlp.register_forward_hook(lambda module, args, out, side=side: seen[side].append(len(args[0])))
    model.batch_loss(torch.tensor([0, 1, 3, 4]), torch.tensor([2, 3, 3, 5]), torch.tensor([6, 7, 1, 0]))
    n_users, n_items = len(users), len(tiny_features.item_profiles)
    distinct_users = len(np.unique(np.delete(users, [2], axis=0), axis=0))
    assert distinct_users < n_users - 1
    assert seen == {"user": [distinct_users + 1], "item": [n_items + 1]}


@pytest.mark.parametrize("fusion, carried", [("residual", True), ("local", False)])
def test_the_local_fusion_keeps_item_corrections_out_of_user_representations(
    fusion, carried, tiny_split, tiny_features
):
    """Under ``local`` a graph backbone's users never carry their items' profile corrections (nor items their
    users'): changing every item profile leaves the final user representations as they were, and the item
    rows move by their own correction at layer 0 only; under ``residual`` the users move too."""
    model = make("lightgcn", "text+profiles", tiny_split, tiny_features, fusion=fusion)
    for layer in (model.fusion.user_profile_mlp[-1], model.fusion.item_profile_mlp[-1]):
        torch.nn.init.normal_(layer.weight, std=0.3)  # off the zero start: corrections are not zero
    model.eval()
    with torch.no_grad():
        users_before, items_before, _, _ = model.forward_all()
        profiles = model.fusion.item_profile.vectors
        profiles.copy_(torch.randn(profiles.shape, generator=torch.Generator().manual_seed(1)))
        users_after, items_after, _, items0 = model.forward_all()
    assert torch.allclose(users_before, users_after, atol=1e-6) != carried
    if not carried:  # an item's final row = the text model's propagated row + its own correction / (L + 1)
        text_only = make("lightgcn", "text", tiny_split, tiny_features)
        text_only.fusion.load_state_dict(model.fusion.state_dict(), strict=False)
        text_only.eval()
        with torch.no_grad():
            _, text_items, _, _ = text_only.forward_all()
            correction = model.fusion.correction("item", None)
        expected = text_items + correction / (model.config.layers + 1)
        assert torch.allclose(items_after, expected, atol=1e-5)


@pytest.mark.parametrize("fusion", ["residual", "local"])
def test_serving_folds_new_users_in_over_what_the_graph_propagates(fusion, tiny_split, tiny_features):
    """Serving a graph model reads the layers it propagated in training: under ``local`` the text model's
    layer 0 (no profile corrections), under ``residual`` layer 0 itself. The served final items are the
    model's, and a re-encoded item gives back its propagation row and, without edges, its final row."""
    from reclm.cf.graph import propagate
    from reclm.serve.reps import ServingModel

    model = make("lightgcn", "text+profiles", tiny_split, tiny_features, fusion=fusion)
    with torch.no_grad():  # give the corrections something to say
        for name, param in model.fusion.named_parameters():
            if "profile_mlp" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    model.eval()
    serve = ServingModel(model, tiny_split.train, tiny_split.n_users, tiny_split.n_items)
    with torch.no_grad():
        users0, items0 = model.fusion.all()
        start = (model.fusion.user_id.weight, model.fusion.text_mlp(model.fusion.item_text))
        x = torch.cat(start if fusion == "local" else (users0, items0))
        assert not torch.allclose(items0, start[1], atol=1e-4)  # the corrections are not zero
        for layer in serve.item_layers:
            np.testing.assert_allclose(layer, x[tiny_split.n_users :].numpy(), rtol=1e-5, atol=1e-6)
            x = propagate(model.adjacency, x)
        _, final_items = model.final_embeddings()
        text, profiles = model.fusion.item_text.numpy(), model.fusion.item_profile().numpy()
    np.testing.assert_allclose(serve.items_final, final_items.numpy(), rtol=1e-5, atol=1e-6)
    rows, final = serve.new_items(text, profiles)
    np.testing.assert_allclose(rows, serve.items0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows, serve.item_layers[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final, items0.numpy() / (model.config.layers + 1), rtol=1e-5, atol=1e-6)
