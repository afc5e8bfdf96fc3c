from __future__ import annotations

from collections import Counter

import numpy as np

from reclm.data.split import Split
from reclm.llm.prompts import parse_profile, user_histories
from reclm.llm.records import read_records
from reclm.llm.teachers import OfflineTeacher

STRICT = r"User identity: [^;]+; User interests: [^;]+\."


def run_offline(data, split, folder):
    report = OfflineTeacher(progress=False).run(data, split, folder)
    users = {r.id: r for r in read_records(folder / "teacher" / "users.jsonl")}
    items = {r.id: r for r in read_records(folder / "teacher" / "items.jsonl")}
    return report, users, items


def test_ml100k_every_profile_valid_and_grounded(ml100k, tmp_path):
    import re

    data, split = ml100k
    report, users, items = run_offline(data, split, tmp_path)
    assert len(users) == data.n_users and len(items) == data.n_items
    assert report.extra["items_from_own_fields"] == data.n_items  # every item, trained or new
    for record in [*users.values(), *items.values()]:
        assert re.fullmatch(STRICT, record.profile), record.profile
        identities, interests = parse_profile(record.profile)
        limit = 3 if record.kind == "user" else 5
        assert 1 <= len(identities) <= limit and 1 <= len(interests) <= limit
    # identity from the user's own features
    for u in (0, 1, 100):
        identities, _ = parse_profile(users[data.user_ids[u]].profile)
        age = int(data.user_fields["age"][u])
        assert any(i.startswith(("Age", "Under")) for i in identities)
        assert {"M": "Male", "F": "Female"}[data.user_fields["gender"][u]] in identities
        assert f"{age}" and data.user_fields["occupation"][u].capitalize() in identities + ["Other", "None"]
    # interests grounded in train items: mostly-Comedy users get Comedy
    histories = user_histories(data, split)
    genres = data.item_fields["genres"]
    comedy_share = [np.mean(["Comedy" in genres[i] for i in h]) if len(h) >= 20 else 0 for h in histories]
    fans = [u for u in np.argsort(comedy_share)[::-1][:10]]
    assert min(comedy_share[u] for u in fans) > 0.5
    for u in fans:
        assert "Comedy" in parse_profile(users[data.user_ids[u]].profile)[1]
    # every item, trained or new, is described from its own fields
    trained = np.unique(split.train[:, 1])[:20]
    for i in [*split.zero_shot_items[:20], *trained]:
        identities, interests = parse_profile(items[data.item_ids[i]].profile)
        own = [g.strip() for g in genres[i].split(",") if g.strip() != "unknown"]
        assert set(own[:3]) <= {x.removesuffix(" fan") for x in identities}
        year = data.item_fields["year"][i]
        if year.isdigit():
            assert f"{int(year) // 10 * 10}s movies" in interests
    assert "not an LLM" in " ".join(report.notes)


def test_tiny_generic_dataset_without_user_features(tiny, tmp_path):
    data, split = tiny
    _, users, _ = run_offline(data, split, tmp_path)
    genre_names = ["Comedy", "Drama", "Horror", "Western"]
    histories = user_histories(data, split)
    for u in range(data.n_users):
        identities, interests = parse_profile(users[data.user_ids[u]].profile)
        counts = Counter(data.item_fields["genres"][i] for i in histories[u])
        top = counts.most_common(1)[0][0]
        assert interests[0] == top == genre_names[u % 4]  # every user mostly watches genre u % 4
        assert identities[0] == f"{top} fan"
        assert identities[1].endswith("items user")


def test_deterministic_and_blind_to_held_out_pairs(tiny, tmp_path):
    data, split = tiny
    _, users_a, items_a = run_offline(data, split, tmp_path / "a")
    _, users_b, items_b = run_offline(data, split, tmp_path / "b")
    assert users_a == users_b and items_a == items_b
    # every file byte for byte (report.json holds no wall-clock time): the stages after it stay cached
    for name in ("users.jsonl", "items.jsonl", "report.json"):
        assert (tmp_path / "a" / "teacher" / name).read_bytes() == (tmp_path / "b" / "teacher" / name).read_bytes()
    # swap the held-out pairs for other ones: profiles must not move
    other = Split(
        split.n_users,
        split.n_items,
        split.train,
        split.test,
        np.zeros((0, 2), dtype=np.int64),
        split.zero_shot_items,
    )
    _, users_c, items_c = run_offline(data, other, tmp_path / "c")
    assert {k: r.profile for k, r in users_c.items()} == {k: r.profile for k, r in users_a.items()}
    assert {k: r.profile for k, r in items_c.items()} == {k: r.profile for k, r in items_a.items()}


def test_item_target_reads_only_the_items_own_fields(tiny, tmp_path):
    """A new item has no users, so no item target may summarise its users: an item's target must not move when
    its train interactions are swapped for users of another taste, and items with the same fields get the same
    target whether they were trained on or are new."""
    data, split = tiny
    _, _, items_a = run_offline(data, split, tmp_path / "a")
    counts = np.bincount(split.train[:, 1], minlength=split.n_items)
    item = int(np.argmax(counts))
    others = np.array([u for u in np.unique(split.train[:, 0]) if u % 4 != item % 4])  # users of other genres
    train = split.train[split.train[:, 1] != item]
    swapped = np.concatenate([train, np.stack([others, np.full(len(others), item)], axis=1)])
    other = Split(split.n_users, split.n_items, swapped, split.valid, split.test, split.zero_shot_items)
    _, _, items_b = run_offline(data, other, tmp_path / "b")
    assert {k: r.profile for k, r in items_b.items()} == {k: r.profile for k, r in items_a.items()}
    # same genre and year (i and i + 20), one new and one trained: the same target
    pairs = [(z, t) for z in split.zero_shot_items.tolist() for t in (z - 20, z + 20) if 0 <= t < 40 and counts[t]]
    assert pairs
    for z, twin in pairs:
        assert items_a[data.item_ids[z]].profile == items_a[data.item_ids[twin]].profile
