"""DPO on preference pairs: the cheaper alternative to PPO (no reward model, no sampling).

Loss: ``-log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))`` with ``log pi(y)`` the
summed log-probability of the response tokens under the chat template (the same response-only labels as
SFT, :func:`reclm.llm.chat.training_example`). Reference log-probabilities are computed once per batch
with the frozen reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from reclm.llm.chat import IGNORE_INDEX, pair_conversation, training_example
from reclm.llm.loop import Checkpointing, ShuffledBatches, TrainingLoop
from reclm.llm.rl.common import gather_logprobs, last_hidden, output_head, trainable_parameters


@dataclass
class DPOConfig:
    """DPO training; the fields the pipeline's ``llm.rl`` also has share its defaults."""

    steps: int = 8
    batch_size: int = 2  # pairs per step
    lr: float = 1e-5
    beta: float = 0.1
    max_seq_len: int = 512
    max_grad_norm: float = 1.0
    # a step's pairs run in pieces of at most this many padded tokens (chosen + rejected), gradients summed:
    # the same update (up to float rounding) with one piece's activations (None: the whole batch at once)
    micro_batch_tokens: int | None = 2048
    seed: int = 0

    # Settings that do not change what a step computes (not part of a checkpoint's fingerprint)
    RESUMABLE = ("micro_batch_tokens",)


def encode_responses(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_len: int, device) -> dict:
    """Right-padded ids and response-only labels; an over-long example loses the START of its prompt."""
    import torch

    rows = [training_example(tokenizer, pair_conversation(p, r)) for p, r in zip(prompts, responses)]
    rows = [(ex.input_ids[-max_len:], ex.labels[-max_len:]) for ex in rows]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (ids, labs) in enumerate(rows):
        input_ids[k, : len(ids)] = torch.tensor(ids)
        labels[k, : len(labs)] = torch.tensor(labs)
        mask[k, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def response_logprob(model, batch: dict):
    """Summed log-probability of the labelled (response) tokens of each row (the vocabulary head runs on
    those positions only)."""
    import torch

    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    hidden = last_hidden(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    logprobs = gather_logprobs(output_head(model)(hidden[keep]), labels[keep])
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[keep]
    return torch.zeros(labels.shape[0], dtype=logprobs.dtype, device=labels.device).index_add(0, rows, logprobs)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """(loss, implicit chosen reward, implicit rejected reward)."""
    import torch.nn.functional as F

    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


class DPOTrainer:
    """DPO of a trainable PEFT ``policy`` against a frozen ``reference`` on (prompt, chosen, rejected) triples."""

    def __init__(self, policy, reference, tokenizer, config: DPOConfig | None = None):
        import torch

        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.config = config or DPOConfig()
        self.device = next(policy.parameters()).device
        self.optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=self.config.lr, weight_decay=0.0)
        self.step_count = 0

    def batch_logprobs(self, model, prompts, chosen, rejected):
        n = len(prompts)
        batch = encode_responses(
            self.tokenizer, list(prompts) * 2, list(chosen) + list(rejected), self.config.max_seq_len, self.device
        )
        logprobs = response_logprob(model, batch)
        return logprobs[:n], logprobs[n:]

    def pieces(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> list[slice]:
        """The step's pairs in pieces of at most ``micro_batch_tokens`` padded tokens (one pair at least)."""
        n, budget = len(prompts), self.config.micro_batch_tokens
        if not budget:
            return [slice(0, n)]
        width = encode_responses(
            self.tokenizer, list(prompts) * 2, list(chosen) + list(rejected), self.config.max_seq_len, "cpu"
        )["input_ids"].shape[1]
        size = max(1, budget // (2 * width))
        return [slice(k, k + size) for k in range(0, n, size)]

    def step(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> dict:
        """One optimiser step on the pairs; each piece adds its share of the mean loss to the gradients."""
        import torch

        n = len(prompts)
        self.optimizer.zero_grad()
        loss, parts = 0.0, []
        for piece in self.pieces(prompts, chosen, rejected):
            triple = (prompts[piece], chosen[piece], rejected[piece])
            with torch.no_grad():
                ref_c, ref_r = self.batch_logprobs(self.reference, *triple)
            pol_c, pol_r = self.batch_logprobs(self.policy, *triple)
            piece_loss, reward_c, reward_r = dpo_loss(pol_c, pol_r, ref_c, ref_r, self.config.beta)
            share = piece_loss * (len(ref_c) / n)
            share.backward()
            loss += float(share.detach())
            parts.append((reward_c, reward_r, pol_c.detach() - ref_c))
        reward_c, reward_r, log_ratio = (torch.cat(column) for column in zip(*parts))
        torch.nn.utils.clip_grad_norm_(trainable_parameters(self.policy), self.config.max_grad_norm)
        self.optimizer.step()
        self.step_count += 1
        return {
            "step": self.step_count,
            "loss": round(loss, 5),
            "reward_chosen": round(float(reward_c.mean()), 5),
            "reward_rejected": round(float(reward_r.mean()), 5),
            "reward_margin": round(float((reward_c - reward_r).mean()), 5),
            "reward_accuracy": round(float((reward_c > reward_r).float().mean()), 4),
            # sequence-level log-ratio to the reference on the chosen responses (a KL proxy)
            "kl_chosen": round(float(log_ratio.mean()), 5),
        }

    def train(
        self,
        triples: Sequence[tuple[str, str, str]],
        steps: int | None = None,
        log: Callable[[dict], None] | None = None,
        checkpoints: Checkpointing | None = None,
    ) -> list[dict]:
        """``steps`` DPO steps over shuffled ``(prompt, chosen, rejected)`` triples; returns each step's stats.
        ``steps`` counts from the trainer's first step (a resumed or stepped trainer does what is left). With
        ``checkpoints`` the state is saved as they say and a rerun resumes from it."""
        if not triples:
            raise ValueError("DPO needs at least one preference pair")
        steps = self.config.steps if steps is None else steps
        batches = ShuffledBatches(len(triples), self.config.batch_size, self.config.seed)
        loop = TrainingLoop(self.policy, self.optimizer, batches, checkpoints or Checkpointing())
        state, resumed = loop.start({"step": self.step_count})
        if resumed is not None:
            self.step_count = resumed

        def step(rows: list[int], _state: dict) -> dict:
            prompts, chosen, rejected = zip(*(triples[k] for k in rows))
            return self.step(prompts, chosen, rejected)

        return loop.run(state, steps, step, None if log is None else lambda _step, stats: log(stats))["history"]

    def evaluate(self, triples: Sequence[tuple[str, str, str]], batch: int = 8) -> dict:
        """Implicit-reward accuracy and margin on held-out triples."""
        import torch

        right, margins = [], []
        with torch.no_grad():
            for start in range(0, len(triples), batch):
                prompts, chosen, rejected = zip(*triples[start : start + batch])
                ref_c, ref_r = self.batch_logprobs(self.reference, prompts, chosen, rejected)
                pol_c, pol_r = self.batch_logprobs(self.policy, prompts, chosen, rejected)
                margin = self.config.beta * ((pol_c - ref_c) - (pol_r - ref_r))
                margins += margin.tolist()
                right += (margin > 0).tolist()
        if not right:
            return {"pairs": 0}
        return {
            "pairs": len(right),
            "accuracy": round(float(np.mean(right)), 4),
            "margin": round(float(np.mean(margins)), 5),
        }
