"""A profile run given its trained ``text`` run (``from_text``): the text model is epoch 0 of the selection
(``candidate``: trained from scratch beside it; ``warm``: trained on from it), so profiles that never beat it
on validation leave the ``text`` model as it was."""

import numpy as np
import pytest

from reclm.cf import train_cf
from reclm.cf.backbones import BACKBONE_CLASSES, build_model
from reclm.cf.config import CFConfig
from reclm.cf.features import SideFeatures

SMALL = dict(dim=8, feature_hidden=[16], ncf_mlp=[16, 8], batch_size=128, topks=[2, 5], valid_metric="ndcg@5")


def config(backbone: str, features: str, **kw) -> CFConfig:
    return CFConfig(backbone=backbone, features=features, fusion="local", threads=1, **{**SMALL, **kw})


def random_profiles(features: SideFeatures, seed: int = 3) -> SideFeatures:
    """Profiles that carry no taste: a random vector per user and per item."""
    rng = np.random.default_rng(seed)
    users = rng.normal(size=features.user_profiles.shape).astype(np.float32)
    items = rng.normal(size=features.item_profiles.shape).astype(np.float32)
    return SideFeatures(features.item_text, users, items)


@pytest.fixture
def text_run(make_split, make_features):
    def train(backbone: str):
        split = make_split(n_users=80, n_items=48, zero_shot=8, per_user=10)
        features = make_features(split)
        text = train_cf(split, config(backbone, "text", epochs=6, patience=6), SideFeatures(features.item_text),
                        show_progress=False)  # fmt: skip
        return split, features, text

    return train


@pytest.mark.parametrize("use", ["candidate", "warm"])
@pytest.mark.parametrize("backbone", sorted(BACKBONE_CLASSES))
def test_the_text_model_is_epoch_0_and_the_run_never_ends_below_it_on_validation(backbone, use, text_run):
    split, features, text = text_run(backbone)
    run = train_cf(
        split, config(backbone, "text+profiles", epochs=4, patience=4, from_text=use, lr=0.05),
        random_profiles(features), show_progress=False, text_state=text.model.state_dict(),
    )  # fmt: skip
    start = run.history[0]
    assert start["epoch"] == 0 and len(run.history) == run.epochs_run + 1
    assert start["valid"] == pytest.approx(text.valid, abs=1e-6)  # epoch 0 is the text model, exactly
    assert run.valid["ndcg@5"] >= text.valid["ndcg@5"] - 1e-9
    if run.best_epoch == 0:  # kept it: every number is the text model's
        assert run.test == pytest.approx(text.test, abs=1e-6)
        assert run.zero_shot == pytest.approx(text.zero_shot, abs=1e-6)
    else:
        assert run.valid["ndcg@5"] > text.valid["ndcg@5"]


def test_a_candidate_trains_as_the_run_without_it_and_warm_trains_from_it(text_run):
    """``candidate`` only adds epoch 0: epochs 1.. are those of the run from scratch (``none``), step for step,
    and it stops where that run stops (patience counts its own epochs, not the trained text model it starts
    far below); ``warm`` trains on from the text model, so its first epoch's loss is far lower."""
    split, features, text = text_run("lightgcn")
    profiles = random_profiles(features)
    runs = {
        use: train_cf(
            split,
            config("lightgcn", "text+profiles", epochs=10, patience=1, from_text=use),
            profiles,
            show_progress=False,
            text_state=None if use == "none" else text.model.state_dict(),
        )  # fmt: skip
        for use in ("none", "candidate", "warm")
    }
    scratch, candidate, warm = (runs[u].history for u in ("none", "candidate", "warm"))
    assert len(scratch) > 2 and [h["epoch"] for h in candidate] == [0, *[h["epoch"] for h in scratch]]
    assert all(a["loss"] == b["loss"] and a["valid"] == b["valid"] for a, b in zip(candidate[1:], scratch))
    assert warm[1]["loss"] < scratch[0]["loss"]


def test_the_text_model_is_refused_where_it_cannot_be_used(tiny_split, tiny_features):
    with pytest.raises(ValueError, match="from_text needs a fusion"):
        CFConfig(features="text+profiles", fusion="concat", from_text="candidate")
    with pytest.raises(ValueError, match="text_state"):
        train_cf(tiny_split, config("bias-mf", "text+profiles", epochs=1, from_text="warm"), tiny_features,
                 show_progress=False)  # fmt: skip
    lightgcn = build_model(config("lightgcn", "text"), tiny_split.n_users, tiny_split.n_items, tiny_split.train,
                           SideFeatures(tiny_features.item_text))  # fmt: skip
    with pytest.raises(ValueError, match="from_text is 'none'"):
        train_cf(tiny_split, config("lightgcn", "text+profiles", epochs=1), tiny_features, show_progress=False,
                 text_state=lightgcn.state_dict())  # fmt: skip
    with pytest.raises(ValueError, match="does not fit"):  # NCF has layers a LightGCN state lacks and vice versa
        train_cf(tiny_split, config("ncf", "text+profiles", epochs=1, from_text="candidate"), tiny_features,
                 show_progress=False, text_state=lightgcn.state_dict())  # fmt: skip
    state = {k: v for k, v in lightgcn.state_dict().items() if "text_mlp" not in k}
    with pytest.raises(ValueError, match="lacks the text model"):
        train_cf(tiny_split, config("lightgcn", "text+profiles", epochs=1, from_text="warm"), tiny_features,
                 show_progress=False, text_state=state)  # fmt: skip
