"""The one training loop (reclm.llm.loop): its batch sources draw what the stages drew before they shared it,
a finished loop's final state is saved (a crash after training redoes nothing), and a checkpoint written by
an earlier version (``losses`` / ``train_curve`` instead of ``history``) still resumes."""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from reclm.llm.loop import (
    Checkpointing,
    CyclicBatches,
    LengthGroupedBatches,
    ShuffledBatches,
    TrainingLoop,
    save_checkpoint,
)
from reclm.llm.sft import length_grouped_batches


def reshuffled_passes(n: int, size: int, seed: int, steps: int, full: bool) -> list[list[int]]:
    """The reward model's (``full``) and DPO's sampling as each wrote it inline before the shared loop."""
    rng = np.random.default_rng(seed)
    order, cursor, out = rng.permutation(n), 0, []
    for _ in range(steps):
        if (cursor + size > len(order)) if full else (cursor >= len(order)):
            order, cursor = rng.permutation(n), 0
        out.append(order[cursor : cursor + size].tolist())
        cursor += size
    return out


def test_shuffled_batches_draw_the_reward_and_dpo_orders():
    for full in (True, False):
        source = ShuffledBatches(10, 4, seed=3, full=full)
        assert [source.next() for _ in range(9)] == reshuffled_passes(10, 4, 3, 9, full)
    short = ShuffledBatches(10, 4, seed=3)
    assert [len(short.next()) for _ in range(3)] == [4, 4, 2]  # DPO keeps a pass's short last batch
    assert [len(ShuffledBatches(10, 4, seed=3, full=True).next()) for _ in range(3)] == [4, 4, 4]


def test_shuffled_batches_resume_where_they_stopped():
    whole = ShuffledBatches(7, 3, seed=1)
    expected = [whole.next() for _ in range(6)]
    first = ShuffledBatches(7, 3, seed=1)
    head = [first.next() for _ in range(4)]
    second = ShuffledBatches(7, 3, seed=1)
    second.restore(first.state())
    assert head + [second.next() for _ in range(2)] == expected


def test_cyclic_batches_wrap_around_and_resume_from_an_old_checkpoint_step():
    source = CyclicBatches(5, 3)
    assert [source.next() for _ in range(3)] == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]
    old = CyclicBatches(5, 3)
    old.restore({"step": 2})  # PPO checkpoints before the shared loop only had the step
    assert old.next() == [1, 2, 3]


def test_length_grouped_batches_walk_epochs_in_groups_of_grad_accum():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    indices = list(range(7))
    source = LengthGroupedBatches(lambda epoch: length_grouped_batches(indices, lengths, 2, 10 + epoch), 3)
    epoch0, epoch1 = length_grouped_batches(indices, lengths, 2, 10), length_grouped_batches(indices, lengths, 2, 11)
    assert [source.next(), source.next(), source.next()] == [epoch0[:3], epoch0[3:], epoch1[:3]]
    assert source.state() == {"epoch": 1, "batch_pos": 3}


def tiny_lora(folder) -> torch.nn.Module:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder)
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


def loss_step(model, optimizer):
    def step(rows: list[int], state: dict) -> float:
        optimizer.zero_grad()
        ids = torch.tensor([[1 + r for r in rows]])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def test_a_finished_loop_is_saved_and_a_rerun_takes_no_step(tiny_model, tmp_path):
    model = tiny_lora(tiny_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loop = TrainingLoop(model, optimizer, ShuffledBatches(6, 2, seed=0), Checkpointing(tmp_path, "run", every=4))
    state, resumed = loop.start()
    assert resumed is None
    history = loop.run(state, 5, loss_step(model, optimizer))["history"]
    assert len(history) == 5 and history[-1] < history[0]

    calls = []
    again = TrainingLoop(model, optimizer, ShuffledBatches(6, 2, seed=0), Checkpointing(tmp_path, "run", every=4))
    state, resumed = again.start()
    assert resumed == 5  # the end was saved, not only step 4
    final = again.run(state, 5, lambda rows, s: calls.append(rows))
    assert calls == [] and final["history"] == history


def test_a_checkpoint_of_an_earlier_version_resumes_with_its_losses(tiny_model, tmp_path):
    model = tiny_lora(tiny_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = ShuffledBatches(6, 2, seed=0)
    batches.next()
    old_state = {"step": 1, "losses": [2.5], "fingerprint": "run", **batches.state()}  # the reward loop's
    save_checkpoint(tmp_path, model, optimizer, None, old_state)
    loop = TrainingLoop(model, optimizer, ShuffledBatches(6, 2, seed=0), Checkpointing(tmp_path, "run"))
    state, resumed = loop.start()
    assert resumed == 1 and state["history"] == [2.5] and state["seconds"] == 0.0
    assert loop.batches.next() == batches.next()
