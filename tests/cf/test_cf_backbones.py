"""Each backbone in each feature mode: forward, backward, gradients reaching the embeddings and MLPs,
and the scoring interfaces agreeing with each other."""

import numpy as np
import pytest
import torch

from reclm.cf.backbones import BACKBONE_CLASSES, build_model
from reclm.cf.config import CFConfig

MODES = ("none", "text", "text+profiles")
# parameters whose gradient must be non-zero after one batch, per feature mode
EXPECTED = {
    "none": ["fusion.user_id.weight", "fusion.item_id.weight"],
    "text": ["fusion.user_id.weight", "fusion.text_mlp.0.weight", "fusion.text_mlp.2.weight"],
    "text+profiles": [  # the default (local) fusion: profile MLPs start with a zero last layer
        "fusion.user_id.weight",
        "fusion.text_mlp.0.weight",
        "fusion.user_profile_mlp.2.weight",
        "fusion.item_profile_mlp.2.weight",
    ],
}


def make(backbone, mode, split, features, **kw):
    torch.manual_seed(0)
    cfg = CFConfig(backbone=backbone, features=mode, dim=8, feature_hidden=[16], ncf_mlp=[16, 8], **kw)
    model = build_model(cfg, split.n_users, split.n_items, split.train, features)
    model.start_epoch(np.random.default_rng(0))
    return model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backbone", sorted(BACKBONE_CLASSES))
def test_forward_backward_reaches_every_encoder(backbone, mode, tiny_split, tiny_features):
    model = make(backbone, mode, tiny_split, tiny_features)
    users = torch.tensor([0, 1, 2, 3])
    pos = torch.as_tensor(tiny_split.train[:4, 1])
    neg = torch.tensor([5, 6, 7, 9])
    terms = model.batch_loss(users, pos, neg)
    assert torch.isfinite(terms["total"]) and terms["total"].item() > 0
    if backbone in ("sgl", "simgcl"):
        assert terms["ssl"].item() > 0
    terms["total"].backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in EXPECTED[mode]:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    if mode != "none":
        assert not any("item_id" in name for name in grads), "text modes must have no item ID embedding"
    scores = model.user_item_scores([0, 5])
    assert scores.shape == (2, tiny_split.n_items) and torch.isfinite(scores).all()


@pytest.mark.parametrize("backbone", ["bias-mf", "lightgcn", "sgl", "simgcl"])
def test_final_embeddings_reproduce_scores(backbone, tiny_split, tiny_features):
    model = make(backbone, "text", tiny_split, tiny_features)
    users, items = model.final_embeddings()
    assert torch.allclose(users[[3, 7]] @ items.T, model.user_item_scores([3, 7]), atol=1e-5)


def test_ncf_full_ranking_scorer_matches_pairwise_scores(tiny_split, tiny_features):
    model = make("ncf", "text+profiles", tiny_split, tiny_features)
    model.eval()
    with torch.no_grad():
        u = model.fusion.users(torch.tensor([2]))
        i = model.fusion.items()
        pairwise = model.pair_scores(u.expand(len(i), -1), i)
    assert torch.allclose(model.user_item_scores([2])[0], pairwise, atol=1e-5)


def test_graph_propagation_mixes_neighbours(tiny_split, tiny_features):
    model = make("lightgcn", "none", tiny_split, tiny_features)
    users, items = model.final_embeddings()
    user, item = tiny_split.train[0]
    with torch.no_grad():
        model.fusion.item_id.weight[item] += 1.0  # change one item's layer-0 embedding
    users2, _ = model.final_embeddings()
    assert not torch.allclose(users[user], users2[user])  # its neighbour moved
    clicked = tiny_split.train[tiny_split.train[:, 1] == item, 0]
    untouched = np.setdiff1d(np.arange(tiny_split.n_users), clicked)
    # users' layers 0 and 2 come from users; only layer 1 reads items: non-clickers stay put
    assert len(untouched) > 0 and torch.allclose(users[untouched], users2[untouched])


def test_sgl_views_drop_edges(tiny_split, tiny_features):
    model = make("sgl", "none", tiny_split, tiny_features, sgl_drop_ratio=0.5)
    full = model.adjacency.to_dense()
    view = model.view1.to_dense()
    assert (view != 0).sum() < (full != 0).sum()


def test_new_items_encoded_from_text_alone(tiny_split, tiny_features):
    model = make("lightgcn", "text+profiles", tiny_split, tiny_features)
    with torch.no_grad():
        text = torch.as_tensor(tiny_features.item_text[:3])
        profile = torch.as_tensor(tiny_features.item_profiles[:3])
        assert torch.allclose(model.fusion.encode_new_items(text, profile), model.fusion.items(torch.arange(3)))
        users = model.fusion.encode_new_users(profile=torch.as_tensor(tiny_features.user_profiles[:2]))
    assert users.shape == (2, 8)


@pytest.mark.parametrize("backbone", ["ncf", "lightgcn"])
def test_scoring_a_subset_of_items_matches_full_scores(backbone, tiny_split, tiny_features):
    model = make(backbone, "text", tiny_split, tiny_features)
    model.eval()
    items = torch.tensor([3, 0, 17])
    with torch.no_grad():
        scorer = model.scorer()
        full = scorer(torch.tensor([1, 4]))
        subset = scorer(torch.tensor([1, 4]), items)
    assert torch.allclose(full[:, items], subset, atol=1e-5)


def test_contrast_nodes_caps_the_batch_nodes_at_random_and_leaves_small_batches_alone():
    from reclm.cf.backbones.base import contrast_nodes

    ids = torch.tensor([4, 1, 4, 9, 7, 1, 3, 8, 2, 9])
    assert contrast_nodes(ids, None).tolist() == [1, 2, 3, 4, 7, 8, 9]
    state = torch.get_rng_state()
    assert contrast_nodes(ids, 7).tolist() == [1, 2, 3, 4, 7, 8, 9]
    assert torch.equal(torch.get_rng_state(), state), "a cap that does not bind must not draw"
    torch.manual_seed(0)
    capped = contrast_nodes(ids, 3)
    assert len(capped) == 3 and len(set(capped.tolist())) == 3 and set(capped.tolist()) <= set(ids.tolist())
    torch.manual_seed(0)
    assert torch.equal(contrast_nodes(ids, 3), capped)  # seeded runs repeat


@pytest.mark.parametrize("backbone", ["sgl", "simgcl"])
def test_ssl_nodes_changes_only_the_contrastive_term(backbone, tiny_split, tiny_features):
    users = torch.tensor([0, 1, 2, 3, 4, 5])
    pos = torch.as_tensor(tiny_split.train[:6, 1])
    neg = torch.tensor([5, 6, 7, 9, 3, 2])
    full = make(backbone, "text", tiny_split, tiny_features).batch_loss(users, pos, neg)
    capped = make(backbone, "text", tiny_split, tiny_features, ssl_nodes=2).batch_loss(users, pos, neg)
    assert capped["bpr"].item() == pytest.approx(full["bpr"].item())
    assert capped["ssl"].item() > 0 and capped["ssl"].item() != pytest.approx(full["ssl"].item())
