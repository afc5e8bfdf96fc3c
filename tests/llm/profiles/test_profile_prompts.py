from __future__ import annotations

import re

import numpy as np
import pytest

from reclm.llm.prompts import (
    COMPACT_ITEM_FORMAT,
    ITEM_PROFILE_FORMAT,
    PROFILE_FORMAT,
    PromptBudget,
    count_tokens,
    domain_for,
    format_profile,
    item_prompt,
    item_prompts,
    parse_profile,
    user_histories,
    user_prompt,
    user_prompts,
)


def named_films(prompt: str) -> list[int]:
    return [int(n) for n in re.findall(r"'title': 'Film (\d+)'", prompt)]


def test_user_prompt_keeps_the_most_recent_items_in_order(tiny):
    data, _ = tiny
    prompt = user_prompt(data, [3, 5, 7, 9, 11], max_items=3, max_words=100)
    assert named_films(prompt) == [7, 9, 11]
    assert PROFILE_FORMAT in prompt
    assert prompt.startswith("Now you are a user profile generator.")
    assert "items the user previously interacted with" in prompt  # generic dataset: generic words
    with pytest.raises(ValueError, match="at least one"):
        user_prompt(data, [])


def test_long_fields_are_cut_to_max_words(tiny):
    data, _ = tiny
    prompt = user_prompt(data, [0], max_words=5)
    assert "'abstract': 'word0 word1 word2 word3 word4 ...'" in prompt
    assert "word5" not in prompt
    full = user_prompt(data, [0], max_words=None)
    assert "word39" in full
    assert "'year': 1950" in full  # numbers unquoted, as in the paper's Netflix prompts


def test_user_features_appear_when_asked(ml100k):
    data, split = ml100k
    history = user_histories(data, split)[0]
    assert "The user's features: age: 24; gender: M; occupation: technician." in user_prompt(data, history, user=0)
    assert "features" not in user_prompt(data, history)


def test_histories_are_train_only_and_chronological(tiny):
    data, split = tiny
    histories = user_histories(data, split)
    held_out = {(int(u), int(i)) for u, i in np.concatenate([split.valid, split.test])}
    time_of = {(int(u), int(i)): t for u, i, t in zip(data.inter_user, data.inter_item, data.timestamps)}
    for u, items in enumerate(histories):
        assert sorted(items.tolist()) == sorted(split.train[split.train[:, 0] == u, 1].tolist())
        times = [time_of[(u, int(i))] for i in items]
        assert times == sorted(times)
        assert not any((u, int(i)) in held_out for i in items)


def test_no_validation_or_test_item_in_any_user_prompt(tiny):
    data, split = tiny
    prompts = user_prompts(data, split, budget=PromptBudget(max_items=None))
    assert len(prompts) == data.n_users
    for u, prompt in prompts.items():
        shown = {data.item_ids.index(str(n)) for n in named_films(prompt)}
        train = set(split.train[split.train[:, 0] == u, 1].tolist())
        assert shown == train


def test_no_validation_or_test_item_in_ml100k_prompts(ml100k):
    data, split = ml100k
    titles = data.item_fields["title"]
    users = list(range(0, data.n_users, 47))
    prompts = user_prompts(data, split, users, PromptBudget(max_items=None, max_words=None))
    for u in users:
        train = set(split.train[split.train[:, 0] == u, 1].tolist())
        train_titles = {titles[i] for i in train}
        for pairs in (split.valid, split.test):
            for i in pairs[pairs[:, 0] == u, 1]:
                if titles[i] not in train_titles:
                    assert repr(titles[i]) not in prompts[u]
        assert prompts[u].count("['title'") == len(train)


def test_fit_to_tokens_drops_oldest_items_first(tiny):
    from transformers import AutoTokenizer

    from reclm.text.encoder import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    data, _ = tiny
    history = list(range(10))
    full = PromptBudget(max_items=10, max_words=10)
    n_full = count_tokens(tokenizer, full.user_prompt(data, history))
    budget = PromptBudget(max_items=10, max_words=10, max_tokens=n_full - 30)
    prompt = budget.user_prompt(data, history, tokenizer=tokenizer)
    kept = named_films(prompt)
    assert count_tokens(tokenizer, prompt) <= n_full - 30
    assert 0 < len(kept) < 10 and kept == history[-len(kept) :]
    # the largest number of recent items that fits: one more would not
    longer = PromptBudget(max_items=len(kept) + 1, max_words=10).user_prompt(data, history)
    assert count_tokens(tokenizer, longer) > n_full - 30
    tiny_budget = PromptBudget(max_items=10, max_words=10, max_tokens=1)
    assert named_films(tiny_budget.user_prompt(data, history, tokenizer=tokenizer)) == [9]


def test_item_prompt_shows_user_and_neighbour_profiles(tiny):
    data, split = tiny
    a = format_profile(["Student"], ["Comedy"])
    b = format_profile(["Retiree"], ["Westerns"])
    prompt = item_prompt(data, 0, neighbour_items=[4, 8], neighbour_profiles=[b, None], user_profiles=[a])
    assert "'title': 'Film 0'" in prompt and ITEM_PROFILE_FORMAT in prompt
    assert f"[{a}]" in prompt
    assert "'title': 'Film 4', 'genres': 'Comedy', 'year': 1990" in prompt
    assert f"targets [{b}]" in prompt
    assert prompt.count(" targets [") == 1  # Film 8 has no profile: shown alone
    with pytest.raises(ValueError, match="aligned"):
        item_prompt(data, 0, [4, 8], [b])
    # the item keeps max_words of each field, neighbours fewer; the budget caps how many neighbours show
    cut = " ".join(f"word{k}" for k in range(10)) + " ...'"
    assert prompt.count(cut) == 2 and " word29 ..." in prompt
    budget = PromptBudget(max_neighbours=1, max_profiles=0)
    short = budget.item_prompt(data, 0, [4, 8], [b, None], [a])
    assert "'Film 4'" in short and "'Film 8'" not in short and "Profiles of users" not in short


def test_item_prompts_use_train_users_only_and_budget(tiny):
    data, split = tiny
    profiles = {u: format_profile([f"User{u}"], ["X"]) for u in range(data.n_users)}
    prompts = item_prompts(data, split, user_profiles=profiles, budget=PromptBudget(max_profiles=2))
    for i, prompt in prompts.items():
        train_users = split.train[split.train[:, 1] == i, 0].tolist()
        shown = [int(n) for n in re.findall(r"User(\d+)", prompt)]
        assert len(shown) == min(2, len(train_users))
        assert set(shown) <= set(train_users)
    for i in split.zero_shot_items:
        assert "Profiles of users" not in prompts[int(i)]


def test_domain_words_come_from_the_dataset(mind):
    data, split = mind
    assert domain_for(data).items == "news articles"
    prompt = user_prompts(data, split, [20])[20]
    assert "news articles the user previously clicked on: ['cate': 'sports', 'sub_cate': 'golf'" in prompt


@pytest.mark.parametrize(
    "text, expected",
    [
        ("User identity: A, B, C; User interests: X, Y, Z.", (["A", "B", "C"], ["X", "Y", "Z"])),
        ("[User identity: Movie buff; User interests: Drama, Humor.]]", (["Movie buff"], ["Drama", "Humor"])),
        ("Sure! User identity: A; User interests: X\n\nHope this helps.", (["A"], ["X"])),
        ("user identities: [A], [B]; user interests: [X]", (["A", "B"], ["X"])),
        ("User identity: A, B", None),
        ("User identity: ; User interests: X.", None),
        ("", None),
    ],
)
def test_parse_profile(text, expected):
    assert parse_profile(text) == expected


def test_format_parse_round_trip():
    identities, interests = ["Age 25-34", "Male", "Engineer"], ["Sci-Fi", "1990s movies"]
    text = format_profile(identities, interests)
    assert text == "User identity: Age 25-34, Male, Engineer; User interests: Sci-Fi, 1990s movies."
    assert parse_profile(text) == (identities, interests)


def test_compact_prompts_show_the_same_items_in_fewer_tokens(ml100k, tokenizer):
    """Compact: instruction first (a prefix every prompt shares), one item per line, about half the tokens."""
    data, split = ml100k
    users = list(range(40))
    paper = user_prompts(data, split, users, PromptBudget(style="paper"))
    compact = user_prompts(data, split, users, PromptBudget(style="compact"))
    histories = user_histories(data, split)
    for u in users:
        lines = [line[2:] for line in compact[u].split("\n") if line.startswith("- ")]
        titles = [data.item_fields["title"][i] for i in histories[u][-10:]]
        assert [line.split(" (")[0] for line in lines] == [t.split(" (")[0] for t in titles]
        assert compact[u].startswith(f"Now you are a user profile generator. Generate the user's profile strictly "
                                     f"in the following format: {PROFILE_FORMAT}")  # fmt: skip
        assert "age: " in compact[u] and "age: " in paper[u]
    paper_tokens = sum(count_tokens(tokenizer, p) for p in paper.values())
    compact_tokens = sum(count_tokens(tokenizer, p) for p in compact.values())
    assert compact_tokens < 0.75 * paper_tokens
    first = "Toy Story (1995; Animation, Children's, Comedy)"
    assert f"\n- {first}" in user_prompt(data, [0, 1], style="compact")


def test_compact_item_prompt_lists_profiles_and_neighbours_line_by_line(tiny):
    data, split = tiny
    budget = PromptBudget(style="compact", max_profiles=2)
    prompt = budget.item_prompt(data, 0, [1, 2], ["User identity: N1; User interests: M1.", None],
                                ["User identity: A; User interests: B.", "User identity: C; User interests: D.",
                                 "User identity: E; User interests: F."])  # fmt: skip
    lines = prompt.split("\n")
    assert lines[0].endswith(COMPACT_ITEM_FORMAT) and "[Identity 5]" in lines[0]
    assert lines[2].startswith("Profiles of users who") and lines[3:5] == [
        "- User identity: C; User interests: D.",
        "- User identity: E; User interests: F.",
    ]  # the most recent max_profiles
    assert lines[5].startswith("Related ") and lines[6].endswith("targets User identity: N1; User interests: M1.")
    assert not lines[7].count("targets")  # a neighbour without a profile shows its text alone
    with pytest.raises(ValueError, match="prompt style 'fancy'"):
        PromptBudget(style="fancy")
