"""The RL stage: ``--rl ppo|dpo|none`` on the profile writer, with reward and KL logged per step.

The policy starts from the adapter it is given (the run's last tuned one: ``collab/adapter`` when
collaborative tuning ran, else ``sft/adapter``, see :meth:`reclm.rundir.RunDir.rl_start_adapter`) and the
reference is that same adapter, frozen (the supervised model RL must stay near). PPO maximises the reward
model's score (``reward/adapter``) minus ``kl_coef`` x KL; DPO fits the preference pairs (``reward/pairs.jsonl``,
built here from the chosen profiles when the reward stage is off). Both are judged the same way before and
after: the reward model's mean score of greedy profiles for held-out users (when a reward model is given) and
the share of profiles in the expected format; DPO also reports its implicit-reward accuracy on the held-out
pairs. The callers (pipeline, CLI) resolve these inputs in the run directory.

Outputs: ``RUN/rl/adapter``, ``RUN/rl/metrics.json`` (per step: score / reward / KL for PPO; loss, implicit
rewards and log-ratio for DPO), ``RUN/rl/prompts.jsonl`` (the RL prompts, with their history item ids).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from reclm.data.dataset import RecDataset
from reclm.data.split import Split
from reclm.distributed import refuse_data_parallel
from reclm.llm.loop import Checkpointing, before_training, fingerprint_of
from reclm.llm.prompts import PromptBudget, parse_profile, user_histories
from reclm.llm.rl import METHODS
from reclm.llm.rl.common import tensors_digest
from reclm.progress import step_progress

PROMPTS_FILE = "prompts.jsonl"


def check_method(method: str) -> None:
    """Refuse several processes and an unknown method: before any input is looked up."""
    refuse_data_parallel(f"RL ({method})")
    if method not in METHODS:
        raise ValueError(f"RL method {method!r}: expected one of {', '.join(METHODS)}")


def user_prompt_set(
    data: RecDataset, split: Split, users: Sequence[int], budget: PromptBudget
) -> tuple[list[int], list[str], list[list[int]]]:
    """(users, prompts, history items the prompts may show) for users with a train history."""
    histories = user_histories(data, split)
    keep = [int(u) for u in users if len(histories[int(u)])]
    prompts = [budget.user_prompt(data, histories[u], u) for u in keep]
    items = [[int(i) for i in (histories[u][-budget.max_items :] if budget.max_items else histories[u])] for u in keep]
    return keep, prompts, items


def write_prompt_records(path: Path, data: RecDataset, users, prompts, items, role: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        for u, prompt, shown in zip(users, prompts, items):
            raw = data.user_ids[u]
            record = {"kind": "user", "id": raw, "prompt": prompt, "role": role,
                      "items": {raw: [data.item_ids[i] for i in shown]}}  # fmt: skip
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def sample_users(split: Split, n: int, seed: int, exclude: set[int] = frozenset()) -> list[int]:
    users = np.array(sorted(set(np.unique(split.train[:, 0]).tolist()) - set(exclude)), dtype=np.int64)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(users, size=min(n, len(users)), replace=False).tolist())


def greedy_profiles(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch: int = 8) -> list[str]:
    """Greedy one-line profiles from the policy being trained (RL evaluation; same stop rule as generation)."""
    import torch

    from reclm.llm.generation.base import stop_token_ids
    from reclm.llm.rl.common import encode_prompts

    stops = stop_token_ids(tokenizer, True)
    out = []
    for start in range(0, len(prompts), batch):
        enc = encode_prompts(tokenizer, prompts[start : start + batch], next(model.parameters()).device)
        with torch.no_grad():
            ids = model.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
            )  # fmt: skip
        for row in ids[:, enc["input_ids"].shape[1] :]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            out.append(text.split("\n", 1)[0].strip())
    return out


def judge(model, tokenizer, prompts, scorer, max_new_tokens: int) -> dict:
    """Mean reward-model score and format rate of the policy's greedy profiles."""
    profiles = greedy_profiles(model, tokenizer, prompts, max_new_tokens)
    result = {"prompts": len(prompts), "parsed": round(float(np.mean([bool(parse_profile(p)) for p in profiles])), 4)}
    if scorer is not None:
        result["score"] = round(float(np.mean(scorer(list(prompts), profiles, []))), 5)
    result["examples"] = profiles[:3]
    return result


class RewardModelScorer:
    """``reward_fn`` for PPO: the trained reward model's score of (prompt, profile)."""

    def __init__(self, base_model: str, adapter: Path, max_len: int = 512, device=None):
        from reclm.llm.reward import RewardConfig, load_reward_model

        self.model, self.tokenizer = load_reward_model(base_model, adapter, RewardConfig(device=device))
        self.model.eval()
        self.max_len = max_len

    def __call__(self, prompts: list[str], responses: list[str], token_ids=None) -> list[float]:
        from reclm.llm.reward import score_texts

        return score_texts(self.model, self.tokenizer, prompts, responses, self.max_len).tolist()


def run_rl(
    data: RecDataset,
    split: Split,
    base_model: str,
    method: str,
    out: Path,
    init_adapter: str | Path | None,
    reward_adapter: Path | None = None,
    pairs: Path | None = None,
    chosen: Mapping[int, str] | None = None,
    neighbours: Mapping[int, Sequence[int]] | None = None,
    options: dict | None = None,
    budget: PromptBudget | None = None,
    eval_users: int = 16,
    max_new_tokens: int = 48,
    log: Callable[[str], None] = print,
) -> dict:
    """Run PPO or DPO (``method``) from ``init_adapter`` (None only for ``none``) into ``out``.

    ``reward_adapter``: the reward model (PPO's reward; the before/after score when given). DPO trains on
    ``pairs`` (a ``pairs.jsonl``), else on pairs built from ``chosen`` (``{user: good profile}``) with
    ``neighbours`` (similar users) for the neighbour negatives. ``options``: steps, batch_size, lr, kl_coef,
    beta, max_seq_len, seed (the pipeline's ``llm.rl``) plus any PPOConfig / DPOConfig field."""
    from reclm.llm.rl.common import load_policy, load_reference, save_adapter, weight_change, weights_snapshot

    check_method(method)
    if method == "none":
        return {"method": "none"}
    check_inputs(method, init_adapter, reward_adapter, pairs, chosen)
    options = dict(options or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = budget or PromptBudget()
    init_adapter = Path(init_adapter)
    start = time.perf_counter()
    seed = int(options.get("seed", 0))
    scorer = None
    if reward_adapter is not None:
        scorer = RewardModelScorer(base_model, reward_adapter, int(options.get("max_seq_len", 512)))

    policy, tokenizer = load_policy(base_model, init_adapter)
    reference = load_reference(base_model, init_adapter)
    (out / PROMPTS_FILE).unlink(missing_ok=True)
    held_users = sample_users(split, eval_users, seed + 1)
    h_users, h_prompts, h_items = user_prompt_set(data, split, held_users, budget)
    write_prompt_records(out / PROMPTS_FILE, data, h_users, h_prompts, h_items, "eval")
    log(f"rl ({method}): the starting policy on {len(h_prompts)} held-out users")
    before = before_training(
        out / "before.json", out, lambda: judge(policy, tokenizer, h_prompts, scorer, max_new_tokens)
    )
    snapshot = weights_snapshot(policy)
    start_point = fingerprint_of(base_model, tensors_digest(snapshot))  # a checkpoint resumes only this start
    extra: dict = {}
    if method == "ppo":
        history, extra = train_ppo(data, split, policy, reference, tokenizer, scorer, options, budget,
                                   set(held_users), out, max_new_tokens, start_point)  # fmt: skip
    else:
        history, extra = train_dpo(data, split, policy, reference, tokenizer, options, budget, out,
                                   pairs, chosen, neighbours, start_point)  # fmt: skip
    after = judge(policy, tokenizer, h_prompts, scorer, max_new_tokens)
    save_adapter(policy, out / "adapter")
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    summary = {
        "method": method,
        "base_model": base_model,
        "init_adapter": str(init_adapter),
        "reference": f"{init_adapter} (frozen)",
        "reward_model": str(reward_adapter) if reward_adapter else None,
        "options": options,
        "before": before,
        "after": after,
        "weight_change": round(weight_change(policy, snapshot), 6),
        "steps": history,
        "seconds": round(time.perf_counter() - start, 1),
        **extra,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    scores = f"reward-model score {before['score']} -> {after['score']}, " if "score" in after else ""
    log(f"rl ({method}): {scores}in the profile format {before['parsed']} -> {after['parsed']}")
    return summary


def check_inputs(method: str, init_adapter, reward_adapter, pairs, chosen) -> None:
    """What PPO / DPO cannot run without (the pipeline and the CLI resolve these in the run, with its errors)."""
    if init_adapter is None:
        raise ValueError(f"RL ({method}) needs the adapter it starts from (init_adapter)")
    if method == "ppo" and reward_adapter is None:
        raise ValueError("PPO needs the reward model (reward_adapter)")
    if method == "dpo" and pairs is None and chosen is None:
        raise ValueError("DPO needs the preference pairs (pairs) or the profiles to build them from (chosen)")


def pick(options: dict, cls) -> dict:
    names = set(cls.__dataclass_fields__)
    return {k: v for k, v in options.items() if k in names}


def run_settings(config) -> dict:
    """A PPO/DPO config's fields that define what its steps compute (a checkpoint's fingerprint)."""
    return {k: v for k, v in asdict(config).items() if k not in type(config).RESUMABLE}


def train_ppo(data, split, policy, reference, tokenizer, scorer, options, budget, exclude, out, max_new_tokens,
              start_point: str = ""):  # fmt: skip
    from reclm.llm.rl.ppo import PPOConfig, PPOTrainer

    config = PPOConfig(**{"max_new_tokens": max_new_tokens, **pick(options, PPOConfig)})
    users = sample_users(split, config.steps * config.batch_size, config.seed, exclude)
    users, prompts, items = user_prompt_set(data, split, users, budget)
    write_prompt_records(out / PROMPTS_FILE, data, users, prompts, items, "train")
    trainer = PPOTrainer(policy, reference, tokenizer, scorer, config)
    key = fingerprint_of("ppo", run_settings(config), start_point, prompts)
    with step_progress("ppo", config.steps) as update:
        history = trainer.train(
            prompts, log=lambda s: update(s["step"], f"score {s['score']} kl {s['kl']} reward {s['reward']}"),
            checkpoints=Checkpointing(out, key),
        )  # fmt: skip
    import torch

    torch.save(trainer.value_head.state_dict(), out / "value_head.pt")
    return history, {"config": asdict(config), "prompts": len(prompts)}


def train_dpo(data, split, policy, reference, tokenizer, options, budget, out, pairs: Path | None,
              chosen: Mapping[int, str] | None, neighbours: Mapping[int, Sequence[int]] | None,
              start_point: str = ""):  # fmt: skip
    """DPO on ``pairs`` (a ``pairs.jsonl``), or on pairs built from ``chosen`` and ``neighbours`` (no neighbours:
    random other users) and written to ``out/pairs.jsonl``."""
    from reclm.llm.reward import PAIRS_FILE, build_pairs, read_pairs, split_by_user, write_pairs
    from reclm.llm.rl.dpo import DPOConfig, DPOTrainer

    config = DPOConfig(**pick(options, DPOConfig))
    if pairs is not None:
        train, held = read_pairs(pairs, data)
        source = str(pairs)
    else:
        built = build_pairs(data, split, chosen, sorted(chosen), neighbours or {}, budget, seed=config.seed)
        train, held = split_by_user(built, 0.2, config.seed)
        source = "built (no reward stage)"
        write_pairs(out / PAIRS_FILE, data, built, {p.user: "eval" for p in held})
    triples = [(p.prompt, p.chosen, p.rejected) for p in train]
    held_triples = [(p.prompt, p.chosen, p.rejected) for p in held][:64]
    trainer = DPOTrainer(policy, reference, tokenizer, config)
    key = fingerprint_of("dpo", run_settings(config), start_point, triples)
    with step_progress("dpo", config.steps) as update:
        history = trainer.train(
            triples, log=lambda s: update(s["step"], f"loss {s['loss']} margin {s['reward_margin']}"),
            checkpoints=Checkpointing(out, key),
        )  # fmt: skip
    evaluation = trainer.evaluate(held_triples) if held_triples else {}
    return history, {
        "config": asdict(config),
        "pairs": {"train": len(triples), "source": source},
        "dpo_eval": evaluation,
    }
