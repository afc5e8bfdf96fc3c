"""Chat template and response-only labels, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from reclm.llm.chat import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    as_conversation,
    pair_conversation,
    prompt_ids,
    prompt_text,
    training_example,
)
from reclm.llm.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_one_turn_labels_cover_the_response_and_end_of_turn_only(tokenizer):
    conversation = pair_conversation("History: Heat, Alien.", "User identity: A; User interests: B.")
    example = training_example(tokenizer, conversation)
    assert labelled_text(tokenizer, example) == "User identity: A; User interests: B.<|im_end|>"
    first = example.labels.index(next(label for label in example.labels if label != IGNORE_INDEX))
    # every prompt token (system, user turn, assistant header) is masked
    assert all(label == IGNORE_INDEX for label in example.labels[:first])
    assert tokenizer.decode(example.input_ids[:first]).endswith("<|im_start|>assistant\n")
    # labels equal the input ids where they are set
    assert all(label in (IGNORE_INDEX, tok) for tok, label in zip(example.input_ids, example.labels))
    assert example.n_label_tokens == len(tokenizer("User identity: A; User interests: B.")["input_ids"]) + 1


def test_two_turn_dialogue_has_loss_on_both_assistant_turns(tokenizer):
    conversation = as_conversation(
        [
            {"role": "user", "content": "Turn one: history Heat."},
            {"role": "assistant", "content": "User identity: fan; User interests: action."},
            {"role": "user", "content": "Will the user click Alien? Yes or No."},
            {"role": "assistant", "content": "Yes"},
        ]
    )
    example = training_example(tokenizer, conversation)
    assert labelled_text(tokenizer, example) == "User identity: fan; User interests: action.<|im_end|>Yes<|im_end|>"
    # the question of turn 2 is not labelled
    question = tokenizer("Will the user click Alien", add_special_tokens=False)["input_ids"]
    start = next(k for k in range(len(example.input_ids)) if example.input_ids[k : k + len(question)] == question)
    assert all(label == IGNORE_INDEX for label in example.labels[start : start + len(question)])


def test_our_short_system_prompt_replaces_the_default(tokenizer):
    text = prompt_text(tokenizer, "Hi")
    system = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
    assert text == system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert "SmolLM" not in text
    default = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert len(prompt_ids(tokenizer, ["Hi"])[0]) <= len(tokenizer(default)["input_ids"]) - 6


def test_bad_conversations_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="assistant"):
        training_example(tokenizer, as_conversation("no answer here"))
    with pytest.raises(ValueError, match="role"):
        as_conversation([{"role": "robot", "content": "x"}])
