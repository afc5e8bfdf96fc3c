"""PPO and DPO on a toy case: one step changes the policy's weights, a few steps move it where the reward
(or the preference) points: the tiny model's probability of answering "Yes" rises."""

from __future__ import annotations

import contextlib

import pytest
import torch

from reclm.llm.loop import Checkpointing
from reclm.llm.rl.common import encode_prompts, forward, load_policy, load_reference, weight_change, weights_snapshot
from reclm.llm.rl.dpo import DPOConfig, DPOTrainer, dpo_loss
from reclm.llm.rl.ppo import PPOConfig, PPOTrainer, gae

YES_NO_PROMPTS = ["Will the user like it?", "Is this a match?"]  # the prompts yes_no_model was tuned on


def answer_probability(policy, tok, word: str) -> float:
    """Mean next-token probability of ``word`` right after the assistant header, over the toy prompts."""
    enc = encode_prompts(tok, YES_NO_PROMPTS, next(policy.parameters()).device)
    token = tok(word, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        logits = forward(policy, enc["input_ids"], enc["attention_mask"]).logits[:, -1]
    return float(torch.softmax(logits.float(), -1)[:, token].mean())


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is after the end of the response
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # lam = gamma = 1: advantage = (sum of future rewards) - V
    assert torch.allclose(adv, torch.tensor([[0.5, 0.8, 0.9, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)  # one-step TD errors
    assert torch.allclose(adv, torch.tensor([[-0.3, -0.1, 0.9, 0.0]]))


def test_ppo_step_changes_weights_and_raises_the_rewarded_answer(yes_no_model):
    torch.manual_seed(0)
    policy, tok = load_policy(yes_no_model, lora={"r": 8, "alpha": 16})
    reference = load_reference(yes_no_model)
    yes = tok("Yes", add_special_tokens=False)["input_ids"][0]

    def reward(prompts, responses, token_ids):  # a reward that prefers one token: answering "Yes"
        return [1.0 if ids and ids[0] == yes else 0.0 for ids in token_ids]

    before = answer_probability(policy, tok, "Yes")
    assert 0.2 < before < 0.8  # a real choice to make
    trainer = PPOTrainer(policy, reference, tok, reward, PPOConfig(batch_size=8, lr=1e-3, max_new_tokens=2, seed=0))
    snapshot = weights_snapshot(policy)
    first = trainer.step(YES_NO_PROMPTS * 4)
    assert weight_change(policy, snapshot) > 0
    assert {"score", "kl", "reward", "pg_loss", "vf_loss"} <= set(first)
    assert first["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself
    history = [first] + [trainer.step(YES_NO_PROMPTS * 4) for _ in range(3)]
    after = answer_probability(policy, tok, "Yes")
    assert after > before + 0.1
    assert history[-1]["kl"] > 0  # the policy moved away from the reference, and the KL says so
    # the reference never moves
    assert answer_probability(reference, tok, "Yes") == pytest.approx(before, abs=1e-5)


def test_ppo_kl_penalty_holds_the_policy_back(yes_no_model):
    """Same toy run with a huge KL coefficient: the reward is drowned, "Yes" barely moves."""
    torch.manual_seed(0)
    policy, tok = load_policy(yes_no_model, lora={"r": 8, "alpha": 16})
    reference = load_reference(yes_no_model)
    yes = tok("Yes", add_special_tokens=False)["input_ids"][0]
    before = answer_probability(policy, tok, "Yes")
    config = PPOConfig(batch_size=8, lr=1e-3, max_new_tokens=2, seed=0, kl_coef=50.0)
    trainer = PPOTrainer(policy, reference, tok, lambda p, r, ids: [float(x[:1] == [yes]) for x in ids], config)
    for _ in range(4):
        trainer.step(YES_NO_PROMPTS * 4)
    assert answer_probability(policy, tok, "Yes") < before + 0.1


def adapter_weights(policy) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in policy.parameters() if p.requires_grad])


@contextlib.contextmanager
def rows_with_gradients(policy):
    """The row counts of the policy's forward passes that keep gradients (the training passes)."""
    rows: list[int] = []

    def count_rows(module, args, kwargs, output):
        if torch.is_grad_enabled():
            rows.append(len(kwargs["input_ids"]))

    hook = policy.get_base_model().get_decoder().register_forward_hook(count_rows, with_kwargs=True)
    try:
        yield rows
    finally:
        hook.remove()


def ppo_run(model, micro_batch_tokens: int | None, steps: int = 3):
    """A toy PPO run; returns its stats, how far its adapter weights moved, its adapter weights, and the row
    counts of the forward passes that kept gradients."""
    torch.manual_seed(0)
    policy, tok = load_policy(model, lora={"r": 8, "alpha": 16})
    reference = load_reference(model)
    yes = tok("Yes", add_special_tokens=False)["input_ids"][0]
    config = PPOConfig(batch_size=8, lr=1e-3, max_new_tokens=2, seed=0, micro_batch_tokens=micro_batch_tokens)
    trainer = PPOTrainer(policy, reference, tok, lambda p, r, ids: [float(x[:1] == [yes]) for x in ids], config)
    start = adapter_weights(policy)
    with rows_with_gradients(policy) as rows:
        history = [trainer.step(YES_NO_PROMPTS * 4) for _ in range(steps)]
    weights = adapter_weights(policy)
    return history, float((weights - start).abs().max()), weights, rows


def test_ppo_in_pieces_makes_the_same_updates_with_one_piece_in_memory(yes_no_model):
    """``micro_batch_tokens`` bounds the rows a training pass holds; the gradients of the pieces add up to
    the whole batch's: the same stats and weights, to float rounding."""
    whole, moved, whole_weights, whole_rows = ppo_run(yes_no_model, None)
    pieces, _, piece_weights, piece_rows = ppo_run(yes_no_model, 1)  # fewer tokens than a row: a row a piece
    assert set(whole_rows) == {8} and len(whole_rows) == 3 * 2  # 3 steps x 2 PPO epochs
    assert set(piece_rows) == {1} and len(piece_rows) == 3 * 2 * 8
    for a, b in zip(whole, pieces):
        assert a["example"] == b["example"]
        for key in ("score", "kl", "reward", "pg_loss", "vf_loss", "approx_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), key
    assert moved > 1e-3  # the weights moved: the tolerance below can fail
    assert torch.allclose(piece_weights, whole_weights, atol=1e-5)


def test_dpo_loss_values():
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5
    )
    # margin = 0.5 * ((-1 + 2) - (-3 + 2)) = 1
    assert float(loss) == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-1.0))))
    assert float(chosen) == pytest.approx(0.5) and float(rejected) == pytest.approx(-0.5)


def test_dpo_step_changes_weights_and_raises_the_chosen_answer(yes_no_model):
    torch.manual_seed(0)
    policy, tok = load_policy(yes_no_model, lora={"r": 8, "alpha": 16})
    reference = load_reference(yes_no_model)
    before = answer_probability(policy, tok, "Yes")
    trainer = DPOTrainer(policy, reference, tok, DPOConfig(batch_size=2, lr=1e-3, beta=0.1))
    triples = [(p, "Yes", "No") for p in YES_NO_PROMPTS]
    snapshot = weights_snapshot(policy)
    first = trainer.step(*zip(*triples))
    assert weight_change(policy, snapshot) > 0
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    history = trainer.train(triples, steps=4)  # steps in all: 3 more
    assert len(history) == 3 and trainer.step_count == 4
    assert history[-1]["reward_margin"] > 0 and history[-1]["loss"] < first["loss"]
    assert answer_probability(policy, tok, "Yes") > before + 0.05
    assert answer_probability(policy, tok, "No") < answer_probability(reference, tok, "No")
    assert trainer.evaluate(triples)["accuracy"] == 1.0


def test_dpo_in_pieces_makes_the_same_updates_with_one_piece_in_memory(yes_no_model):
    def run(micro_batch_tokens):
        torch.manual_seed(0)
        policy, tok = load_policy(yes_no_model, lora={"r": 8, "alpha": 16})
        config = DPOConfig(batch_size=4, lr=1e-3, beta=0.1, micro_batch_tokens=micro_batch_tokens)
        trainer = DPOTrainer(policy, load_reference(yes_no_model), tok, config)
        triples = [(p, "Yes", "No") for p in YES_NO_PROMPTS] + [(p, "Sure", "Never") for p in YES_NO_PROMPTS]
        with rows_with_gradients(policy) as rows:
            history = trainer.train(triples, steps=3)
        return history, adapter_weights(policy), rows

    whole, whole_weights, whole_rows = run(None)
    pieces, piece_weights, piece_rows = run(1)  # fewer tokens than a pair: a pair a piece
    assert whole_rows == [8] * 3 and piece_rows == [2] * 12  # chosen + rejected of 4 pairs, or of one
    for a, b in zip(whole, pieces):
        for key in ("loss", "reward_margin", "kl_chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    assert whole[-1]["reward_margin"] > 0.01  # it learned: the agreement below is not of two idle runs
    assert torch.allclose(piece_weights, whole_weights, atol=1e-5)


def stop_at(step: int):
    def log(stats: dict) -> None:
        if stats["step"] == step:
            raise KeyboardInterrupt

    return log


@pytest.mark.parametrize("method", ["ppo", "dpo"])
def test_interrupted_rl_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(method, yes_no_model, tmp_path):
    """Saved every 2 steps; stopped at step 3, a new trainer on the same folder resumes at step 2 and ends
    with the same per-step stats and the same policy as a run that was never interrupted."""
    yes = None

    def trained(folder, log=None, key="run"):
        nonlocal yes
        torch.manual_seed(0)
        policy, tok = load_policy(yes_no_model, lora={"r": 8, "alpha": 16})
        reference = load_reference(yes_no_model)
        yes = tok("Yes", add_special_tokens=False)["input_ids"][0]
        if method == "ppo":
            reward = lambda p, r, ids: [float(x[:1] == [yes]) for x in ids]  # noqa: E731
            config = PPOConfig(batch_size=4, lr=1e-3, max_new_tokens=2, seed=0)
            trainer = PPOTrainer(policy, reference, tok, reward, config)
            data = YES_NO_PROMPTS * 2
        else:
            trainer = DPOTrainer(policy, reference, tok, DPOConfig(batch_size=2, lr=1e-3, beta=0.1))
            data = [(p, "Yes", "No") for p in YES_NO_PROMPTS] + [(p, "Sure", "Never") for p in YES_NO_PROMPTS]
        history = trainer.train(data, steps=5, log=log, checkpoints=Checkpointing(folder, key, every=2))
        return history, answer_probability(policy, tok, "Yes")

    whole, whole_yes = trained(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        trained(tmp_path / "cut", log=stop_at(3))
    resumed, resumed_yes = trained(tmp_path / "cut")
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5]
    assert resumed == whole
    assert resumed_yes == pytest.approx(whole_yes, abs=1e-6)
    with pytest.raises(ValueError, match="other data or settings"):
        trained(tmp_path / "cut", key="another run")
