"""LoRA SFT on a tiny real Llama: loss goes down, the adapter loads, a crashed run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from reclm.llm.model import load_base
from reclm.llm.records import ProfileRecord, write_records
from reclm.llm.sft import (
    LoraSettings,
    TrainSettings,
    holdout_split,
    length_grouped_batches,
    micro_batches,
    train_lora,
    train_sft,
)


def settings(**kw) -> TrainSettings:
    base = {"steps": 10, "batch_size": 6, "lr": 2e-2, "holdout": 0.25, "eval_every": 5, "save_every": 2}
    return TrainSettings(**{**base, **kw, "threads": 1})


def test_sft_lowers_losses_and_writes_a_loadable_adapter(tiny_model, toy_conversations, tmp_path):
    result = train_lora(toy_conversations, tmp_path, tiny_model, train=settings(), progress=False)
    assert result.steps == 10 and result.n_train == 18 and result.n_heldout == 6
    first = sum(loss for _, loss in result.train_curve[:2]) / 2
    last = sum(loss for _, loss in result.train_curve[-2:]) / 2
    assert last < 0.75 * first
    assert result.heldout_loss_after < 0.75 * result.heldout_loss_before  # held-out pairs share the format
    assert [step for step, _ in result.eval_curve] == [0, 5, 10]

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["label_tokens"] > 0 and metrics["seconds"] > 0
    assert len(metrics["train_curve"]) == 10

    tuned, tokenizer = load_base(tiny_model, device="cpu", adapter=result.adapter)
    plain, _ = load_base(tiny_model, device="cpu")
    ids = tokenizer("Movies watched: Drama film 1.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, plain(ids).logits)


def test_crashed_run_resumes_from_its_checkpoint_with_the_same_result(tiny_model, toy_conversations, tmp_path):
    whole = train_lora(toy_conversations, tmp_path / "whole", tiny_model, train=settings(), progress=False)

    class Crash(RuntimeError):
        pass

    def crash_at_step_5(step: int, loss: float) -> None:
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train_lora(toy_conversations, tmp_path / "cut", tiny_model, train=settings(), progress=False,
                   on_step=crash_at_step_5)  # fmt: skip
    assert not (tmp_path / "cut" / "adapter").exists()
    resumed = train_lora(toy_conversations, tmp_path / "cut", tiny_model, train=settings(), progress=False)
    assert resumed.resumed_from == 4  # the last checkpoint before the crash (save_every=2)
    assert resumed.steps == 10
    # the resumed run replays steps 5..10 exactly as the uninterrupted run did
    for (s1, l1), (s2, l2) in zip(whole.train_curve, resumed.train_curve):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4)
    assert resumed.heldout_loss_after == pytest.approx(whole.heldout_loss_after, rel=1e-4)

    # a finished run is not trained again; other settings refuse the checkpoint
    again = train_lora(toy_conversations, tmp_path / "cut", tiny_model, train=settings(), progress=False)
    assert again.resumed_from == 10 and again.steps == 10
    with pytest.raises(ValueError, match="other data or settings"):
        train_lora(toy_conversations, tmp_path / "cut", tiny_model, train=settings(lr=1e-3), progress=False)


def test_train_sft_reads_teacher_records_and_writes_heldout_ids(tiny_model, toy_conversations, tmp_path):
    teacher = tmp_path / "teacher"
    records = [ProfileRecord("user", str(k), c[1]["content"], c[2]["content"]) for k, c in enumerate(toy_conversations)]
    write_records(teacher / "users.jsonl", records)
    result = train_sft(teacher, tmp_path / "sft", tiny_model, lora={"r": 4, "alpha": 8}, steps=3, batch_size=8,
                       holdout=0.25, seed=3, threads=1, progress=False)  # fmt: skip
    heldout = json.loads((tmp_path / "sft" / "heldout.json").read_text())
    assert len(heldout["user"]) == 6 == result.n_heldout and heldout["item"] == []
    assert set(heldout["user"]) <= {r.id for r in records}
    assert (tmp_path / "sft" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    with pytest.raises(ValueError, match="unknown TrainSettings"):
        train_sft(teacher, tmp_path / "x", tiny_model, stepz=3)


def test_holdout_keeps_identical_prompts_on_one_side():
    """Many users share a history: a held-out prompt must not also be a training prompt."""
    groups = [f"history-{i % 7}" for i in range(70)]  # 7 distinct prompts, 10 copies each
    train, held = holdout_split(70, 0.1, seed=3, groups=groups)
    assert sorted(train + held) == list(range(70))
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in held})
    assert len(held) == 10  # one whole group: the first that reaches 10% of the examples
    assert holdout_split(3, 0.5, seed=0, groups=["a", "a", "a"]) == ([0, 1, 2], [])  # one group cannot be split
    with pytest.raises(ValueError, match="2 group keys for 3"):
        holdout_split(3, 0.1, seed=0, groups=["a", "b"])


def test_sft_holdout_is_grouped_by_prompt(tmp_path, tiny_model):
    from reclm.llm.chat import pair_conversation

    same = [pair_conversation("Movies watched: A, B.", f"User identity: x{i}; User interests: y.") for i in range(6)]
    other = [pair_conversation(f"Movies watched: C{i}.", "User identity: z; User interests: w.") for i in range(6)]
    result = train_lora(same + other, tmp_path, tiny_model, train=settings(steps=1, holdout=0.4), progress=False)
    split = json.loads((tmp_path / "split.json").read_text())
    shared = set(range(6))
    assert split["heldout"] and result.n_heldout == len(split["heldout"])
    assert shared <= set(split["train"]) or shared <= set(split["heldout"])


def test_holdout_split_and_batches_are_seeded():
    train, held = holdout_split(50, 0.1, seed=1)
    assert len(held) == 5 and sorted(train + held) == list(range(50))
    assert holdout_split(50, 0.1, seed=1) == (train, held) != holdout_split(50, 0.1, seed=2)
    assert holdout_split(5, 0.01, seed=0)[1] != []  # at least one held out when asked
    lengths = list(range(100, 0, -1))
    batches = length_grouped_batches(list(range(100)), lengths, 10, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert batches == length_grouped_batches(list(range(100)), lengths, 10, seed=0)
    # within a batch lengths are close (sorted windows), not spread over the whole range
    assert max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) < 20


def test_micro_batches_bound_memory_without_changing_the_step(tiny_model, toy_conversations, tmp_path):
    lengths = [30, 31, 32, 33, 34, 35]
    assert micro_batches(list(range(6)), lengths, 70) == [[0, 1], [2, 3], [4, 5]]
    assert micro_batches(list(range(6)), lengths, None) == [list(range(6))]
    assert micro_batches([0], lengths, 1) == [[0]]
    no_dropout = LoraSettings(dropout=0.0)  # dropout masks depend on the piece shapes
    whole = train_lora(toy_conversations, tmp_path / "a", tiny_model, no_dropout, progress=False,
                       train=settings(steps=3, micro_batch_tokens=None, save_every=0, eval_every=0))  # fmt: skip
    split = train_lora(toy_conversations, tmp_path / "b", tiny_model, no_dropout, progress=False,
                       train=settings(steps=3, micro_batch_tokens=40, save_every=0, eval_every=0))  # fmt: skip
    assert [loss for _, loss in split.train_curve] == pytest.approx([loss for _, loss in whole.train_curve], rel=1e-4)
