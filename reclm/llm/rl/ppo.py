"""PPO on the profile writer, written on torch (trl 1.16 no longer ships a PPO trainer).

One step: sample a response per prompt with the policy; score it with the reward function (the reward
model); per-token rewards are ``-kl_coef * (log pi - log pi_ref)`` plus the score on the last token; a
value head on the policy's last hidden state gives V; advantages by GAE; then ``ppo_epochs`` passes of the
clipped policy loss and the clipped value loss over mini-batches. The logged ``kl`` is the summed per-token
``log pi - log pi_ref`` of the sampled responses, averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from reclm.llm.loop import Checkpointing, CyclicBatches, TrainingLoop
from reclm.llm.rl.common import (
    encode_prompts,
    gather_logprobs,
    last_hidden,
    output_head,
    trainable_parameters,
)

# reward_fn(prompts, response texts, response token ids) -> one score per response
RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence[float]]


@dataclass
class PPOConfig:
    """PPO training; the fields the pipeline's ``llm.rl`` also has share its defaults."""

    steps: int = 8
    batch_size: int = 2  # rollouts per step
    mini_batch_size: int | None = None  # default: the whole batch
    # a mini-batch's forward/backward runs in pieces of at most this many padded tokens, gradients summed:
    # the same update (up to float rounding) with activations for a piece only (None: the whole mini-batch)
    micro_batch_tokens: int | None = 2048
    ppo_epochs: int = 2
    lr: float = 1e-5
    value_lr: float | None = None  # default: 10 x lr
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    max_new_tokens: int = 48
    temperature: float = 1.0
    whiten_advantages: bool = True
    single_line: bool = True  # stop at a newline as well as at end of turn (profiles are one line)
    max_grad_norm: float = 1.0
    seed: int = 0

    # Settings that do not change what a step computes (not part of a checkpoint's fingerprint)
    RESUMABLE = ("micro_batch_tokens",)


@dataclass
class Rollout:
    input_ids: Any  # (B, P + R) prompt (left-padded) + response (right-padded)
    attention_mask: Any
    response_mask: Any  # (B, R): 1 on response tokens up to and including the first eos
    prompt_len: int
    responses: list[str]
    response_ids: list[list[int]]


@dataclass
class Targets:
    """What a step's updates compare against, per response token: the rollout's log-probabilities and values,
    the advantages and returns, and the response mask."""

    logprobs: Any
    values: Any
    advantages: Any
    returns: Any
    mask: Any


def value_head(hidden: int, device=None):
    """A linear value estimate on the policy's final hidden state."""
    import torch

    head = torch.nn.Linear(hidden, 1)
    torch.nn.init.normal_(head.weight, std=1.0 / (hidden + 1))
    torch.nn.init.zeros_(head.bias)
    return head.to(device) if device is not None else head


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1)


def token_share(values, mask, tokens):
    """This piece's share of a token mean over ``tokens`` tokens (one piece: ``masked_mean``)."""
    return (values * mask).sum() / tokens


def masked_whiten(values, mask, eps: float = 1e-8):
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * (var + eps).rsqrt() * mask


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimates and returns over the response tokens (``mask`` ends each sequence)."""
    import torch

    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_mask = mask[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        last = delta + gamma * lam * last * next_mask
        advantages[:, t] = last * mask[:, t]
    return advantages, (advantages + values) * mask


class PPOTrainer:
    """PPO with a KL penalty against a frozen reference. ``policy``: a PEFT model with a trainable adapter
    (in eval mode: no dropout); ``reference``: the frozen model to stay close to; ``reward_fn(prompts,
    responses) -> scores``."""

    def __init__(self, policy, reference, tokenizer, reward_fn: RewardFn, config: PPOConfig | None = None):
        import torch

        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.reward_fn = reward_fn
        self.config = config or PPOConfig()
        self.device = next(policy.parameters()).device
        hidden = policy.config.hidden_size if hasattr(policy, "config") else policy.base_model.config.hidden_size
        torch.manual_seed(self.config.seed)
        self.value_head = value_head(hidden, self.device)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": trainable_parameters(policy), "lr": self.config.lr},
                {"params": list(self.value_head.parameters()), "lr": self.config.value_lr or 10 * self.config.lr},
            ],
            weight_decay=0.0,
        )
        self.generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        self.step_count = 0

    # ------------------------------------------------------------ rollouts
    def rollout(self, prompts: Sequence[str]) -> Rollout:
        import torch

        from reclm.llm.generation.base import stop_token_ids

        enc = encode_prompts(self.tokenizer, prompts, self.device)
        stops = stop_token_ids(self.tokenizer, self.config.single_line)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        with torch.no_grad():
            out = self.policy.generate(
                **enc,
                do_sample=True,
                temperature=self.config.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=self.config.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=stops,
            )
        prompt_len = enc["input_ids"].shape[1]
        response = out[:, prompt_len:]
        is_stop = torch.isin(response, torch.tensor(stops, device=response.device)).long()
        after_eos = (is_stop.cumsum(-1) - is_stop) > 0  # strictly after the first stop token
        response_mask = (~after_eos).long()
        if response.shape[1] == 0:
            raise ValueError("the policy generated nothing (max_new_tokens=0?)")
        attention = torch.cat([enc["attention_mask"], response_mask], dim=1)
        ids = [r[m.bool()].tolist() for r, m in zip(response, response_mask)]
        texts = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
        return Rollout(out, attention, response_mask, prompt_len, texts, ids)

    def response_logprobs(self, model, rollout: Rollout, with_values: bool = False):
        """Per-token log-probabilities of the response (and values, from the policy's last hidden state); the
        vocabulary head runs on the response positions only."""
        p = rollout.prompt_len
        hidden = last_hidden(model, rollout.input_ids, rollout.attention_mask)[:, p - 1 : -1]
        logits = output_head(model)(hidden)
        logprobs = gather_logprobs(logits / self.config.temperature, rollout.input_ids[:, p:])
        if not with_values:
            return logprobs, None
        values = self.value_head(hidden.float()).squeeze(-1)
        return logprobs, values

    # ------------------------------------------------------------ one optimiser step
    def pieces(self, rows, width: int) -> list:
        """``rows`` in pieces of at most ``micro_batch_tokens`` padded tokens of ``width`` (one row at least)."""
        budget = self.config.micro_batch_tokens
        size = max(1, budget // width) if budget else len(rows)
        return [rows[k : k + size] for k in range(0, len(rows), size)]

    def update(self, rollout: Rollout, rows, targets: Targets) -> dict:
        """One optimiser step on the mini-batch ``rows``: the clipped policy loss plus ``vf_coef`` x the clipped
        value loss, token means over the mini-batch. Its pieces' gradients are summed (each piece's share of
        the means), so the step is the mini-batch's whatever the piece size, with one piece's activations."""
        import torch

        cfg = self.config
        tokens = targets.mask[rows].sum().clamp(min=1)
        stats = dict.fromkeys(("pg_loss", "vf_loss", "clipfrac", "approx_kl"), 0.0)
        self.optimizer.zero_grad()
        for piece in self.pieces(rows, rollout.input_ids.shape[1]):
            sub = Rollout(rollout.input_ids[piece], rollout.attention_mask[piece], rollout.response_mask[piece],
                          rollout.prompt_len, [], [])  # fmt: skip
            m = targets.mask[piece]
            logprobs, values = self.response_logprobs(self.policy, sub, with_values=True)
            old = targets.logprobs[piece]
            ratio = torch.exp(logprobs - old)
            adv = targets.advantages[piece]
            pg = token_share(
                torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)), m, tokens
            )
            v_old = targets.values[piece]
            v_clip = v_old + (values - v_old).clamp(-cfg.clip_range_value, cfg.clip_range_value)
            ret = targets.returns[piece]
            vf = 0.5 * token_share(torch.max((values - ret) ** 2, (v_clip - ret) ** 2), m, tokens)
            (pg + cfg.vf_coef * vf).backward()
            with torch.no_grad():
                stats["pg_loss"] += float(pg)
                stats["vf_loss"] += float(vf)
                stats["clipfrac"] += float(token_share(((ratio - 1).abs() > cfg.clip_range).float(), m, tokens))
                stats["approx_kl"] += float(token_share(0.5 * (logprobs - old) ** 2, m, tokens))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        self.optimizer.step()
        return stats

    # ------------------------------------------------------------ one PPO step
    def step(self, prompts: Sequence[str]) -> dict:
        import torch

        cfg = self.config
        rollout = self.rollout(prompts)
        scores = torch.tensor(
            [float(s) for s in self.reward_fn(list(prompts), rollout.responses, rollout.response_ids)],
            device=self.device,
        )
        mask = rollout.response_mask.float()
        with torch.no_grad():
            old_logprobs, old_values = self.response_logprobs(self.policy, rollout, with_values=True)
            ref_logprobs, _ = self.response_logprobs(self.reference, rollout)
        kl = (old_logprobs - ref_logprobs) * mask
        rewards = -cfg.kl_coef * kl
        last = (mask.sum(dim=1).long() - 1).clamp(min=0)
        rewards[torch.arange(len(last)), last] += scores
        advantages, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages and mask.sum() > 1:
            advantages = masked_whiten(advantages, mask)
        stats = dict.fromkeys(("pg_loss", "vf_loss", "clipfrac", "approx_kl"), 0.0)
        updates = 0
        size = cfg.mini_batch_size or len(prompts)
        targets = Targets(old_logprobs, old_values, advantages, returns, mask)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(prompts), generator=self.generator)
            for start in range(0, len(prompts), size):
                rows = order[start : start + size].to(self.device)
                update = self.update(rollout, rows, targets)
                stats = {k: stats[k] + update[k] for k in stats}
                updates += 1
        self.step_count += 1
        seq_kl = kl.sum(dim=1)
        return {
            "step": self.step_count,
            "score": round(float(scores.mean()), 5),
            "kl": round(float(seq_kl.mean()), 5),
            "reward": round(float((scores - cfg.kl_coef * seq_kl).mean()), 5),
            "response_tokens": round(float(mask.sum(dim=1).mean()), 2),
            **{k: round(v / max(1, updates), 5) for k, v in stats.items()},
            "example": rollout.responses[0][:200],
        }

    def train(
        self,
        prompts: Sequence[str],
        steps: int | None = None,
        log: Callable[[dict], None] | None = None,
        checkpoints: Checkpointing | None = None,
    ) -> list[dict]:
        """``steps`` PPO steps over ``prompts`` in batches of ``batch_size`` (cycling); returns each step's stats.
        ``steps`` counts from the trainer's first step (a resumed or stepped trainer does what is left). With
        ``checkpoints`` the state is saved as they say and a rerun resumes from it."""
        steps = self.config.steps if steps is None else steps
        if not prompts:
            raise ValueError("PPO needs at least one prompt")
        batches = CyclicBatches(len(prompts), self.config.batch_size)
        batches.taken = self.step_count
        loop = TrainingLoop(self.policy, self.optimizer, batches, checkpoints or Checkpointing(), parts=[self])
        state, resumed = loop.start({"step": self.step_count})
        if resumed is not None:
            self.step_count = resumed

        def step(rows: list[int], _state: dict) -> dict:
            return self.step([prompts[k] for k in rows])

        return loop.run(state, steps, step, None if log is None else lambda _step, stats: log(stats))["history"]

    def state(self) -> dict:
        """What a checkpoint keeps besides the adapter and optimizer: the shuffling generator, the value head."""
        return {"generator": self.generator.get_state(), "value_head": self.value_head.state_dict()}

    def restore(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.value_head.load_state_dict(state["value_head"])
