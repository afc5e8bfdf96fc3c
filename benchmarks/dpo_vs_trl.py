"""reclm's DPOTrainer against trl's DPOTrainer: same base model, LoRA, preference pairs, steps and settings.

A measurement for a design decision (would trl's trainer do the same job as simply?), not a dependency: trl
is imported only here. Install it outside the project environment and point ``TRL_PATH`` at it; the folder
is appended AFTER the environment's site-packages, so the project's torch/transformers/peft win:

    pip install --no-deps --target /root/trl-pkgs trl==1.16.0
    TRL_PATH=/root/trl-pkgs python benchmarks/dpo_vs_trl.py                       # tiny random Llama, 20 steps
    TRL_PATH=/root/trl-pkgs python benchmarks/dpo_vs_trl.py --model packaged --steps 8

Both sides start from the same LoRA initialisation (same seed, ``load_policy``), train against a separate
frozen reference (``load_reference``; ``--trl-ref adapter`` lets trl use a copy of the adapter instead), with
AdamW at a constant learning rate, gradient clipping at 1.0, fp32, one CPU thread. What differs: the order
of the batches (each trainer shuffles its own way) and the scored tokens (trl also scores the newline after
the end-of-turn marker). The held-out implicit-reward accuracy and margin are computed by the same code for
both (reclm's ``DPOTrainer.evaluate`` on the trained policy and its frozen reference).
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOPICS = ["football", "elections", "weather", "markets", "travel", "music", "cinema", "science", "health", "cooking"]
INSTALL = (
    "trl is not importable: pip install --no-deps --target /root/trl-pkgs trl==1.16.0 "
    "and run with TRL_PATH=/root/trl-pkgs (a benchmark-only package, not a reclm dependency)"
)


def make_triples(count: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): a profile in the expected format against a degraded, unformatted one."""
    rng = random.Random(seed)
    triples = []
    for k in range(count):
        a, b, c = rng.sample(TOPICS, 3)
        prompt = f"User {seed * 1000 + k} clicked news about {a}, {b} and {c}. Write their profile."
        chosen = f"Interests: {a}, {b}, {c}. Reads short articles in the morning."
        rejected = f"{a} {a} news {b} news {c} {c}"
        triples.append((prompt, chosen, rejected))
    return triples


def import_trl():
    if os.environ.get("TRL_PATH"):
        sys.path.append(os.environ["TRL_PATH"])
    try:
        import trl
    except ImportError:
        sys.exit(INSTALL)
    return trl


# ---------------------------------------------------------------- the glue: triples -> trained adapter


def reclm_glue(base, triples, cfg: dict, out: Path, hook=None):
    from reclm.llm.rl.common import load_policy, load_reference, save_adapter
    from reclm.llm.rl.dpo import DPOConfig, DPOTrainer

    policy, tokenizer = load_policy(base, device="cpu")
    reference = load_reference(base, device="cpu")
    history = DPOTrainer(policy, reference, tokenizer, DPOConfig(**cfg)).train(triples, log=hook)
    save_adapter(policy, out)
    return policy, reference, tokenizer, history


def trl_glue(base, triples, cfg: dict, out: Path, hook=None, own_reference: bool = True):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from reclm.llm.chat import as_conversation
    from reclm.llm.rl.common import load_policy, load_reference, save_adapter

    policy, tokenizer = load_policy(base, device="cpu")
    reference = load_reference(base, device="cpu") if own_reference else None
    rows = [
        {
            "prompt": as_conversation(p),  # reclm's system prompt, as reclm's encode_responses renders it
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
        for p, c, r in triples
    ]
    args = DPOConfig(
        output_dir=str(out / "trl-run"),
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch_size"],
        learning_rate=cfg["lr"],
        beta=cfg["beta"],
        max_length=cfg["max_seq_len"],
        max_grad_norm=cfg["max_grad_norm"],
        seed=cfg["seed"],
        lr_scheduler_type="constant",  # default: linear decay
        bf16=False,  # default: True, also on CPU
        gradient_checkpointing=False,  # default: True
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[hook] if hook else None,
    )
    trainer.train()
    save_adapter(policy, out)
    history = [h for h in trainer.state.log_history if "loss" in h]
    return policy, reference, tokenizer, history


def code_lines(function) -> int:
    """Lines of a function's body: no signature, docstring, comment or blank line."""
    body = inspect.getsource(function).splitlines()[1:]
    return sum(1 for line in body if line.strip() and not line.strip().startswith(("#", '"""')))


# ---------------------------------------------------------------- the harness


def step_timer():
    """(times list, reclm log hook, trl callback): each appends perf_counter() at the end of a step."""
    from transformers import TrainerCallback

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    return times, lambda _stats: times.append(time.perf_counter()), Timer()


def held_out(policy, reference, tokenizer, triples, cfg: dict) -> dict:
    """The same evaluation for both sides: reclm's implicit-reward accuracy and margin."""
    from reclm.llm.rl.dpo import DPOConfig, DPOTrainer

    config = DPOConfig(beta=cfg["beta"], max_seq_len=cfg["max_seq_len"])
    return DPOTrainer(policy, reference, tokenizer, config).evaluate(triples)


def run(side: str, base, train, test, cfg: dict, trl_ref: str) -> dict:
    import torch

    from reclm.llm.rl.common import load_reference

    times, reclm_hook, trl_hook = step_timer()
    torch.manual_seed(cfg["seed"])  # the same LoRA initialisation on both sides
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if side == "reclm":
            policy, reference, tokenizer, history = reclm_glue(base, train, cfg, Path(out), reclm_hook)
            losses = [h["loss"] for h in history]
        else:
            own = trl_ref == "model"
            policy, reference, tokenizer, history = trl_glue(base, train, cfg, Path(out), trl_hook, own)
            losses = [h["loss"] for h in history]
            if reference is None:  # trl scored against the adapter copy; evaluate against the base model
                reference = load_reference(base, device="cpu")
    total = time.perf_counter() - start
    threads = torch.get_num_threads()
    result = held_out(policy, reference, tokenizer, test, cfg)
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    tail = losses[-5:]
    return {
        "side": side,
        "steps": len(times),
        "s_per_step": per_step,
        "first_step_s": times[0] - start if times else float("nan"),
        "total_s": total,
        "final_loss": losses[-1],
        "last5_loss": sum(tail) / len(tail),
        "accuracy": result["accuracy"],
        "margin": result["margin"],
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (a random 2-layer Llama), packaged, or a HF folder")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=32, help="training triples")
    parser.add_argument("--heldout", type=int, default=16, help="held-out triples")
    parser.add_argument("--trl-ref", choices=["model", "adapter"], default="model", help="trl's reference")
    args = parser.parse_args()

    trl = import_trl()
    import peft
    import torch
    import transformers

    from reclm.llm.model import DEFAULT_MODEL, build_tiny_model

    torch.set_num_threads(1)
    cfg = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "beta": args.beta,
        "max_seq_len": args.max_seq_len,
        "max_grad_norm": 1.0,
        "seed": args.seed,
    }
    train, test = make_triples(args.train, seed=1), make_triples(args.heldout, seed=2)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"trl {trl.__version__} ({Path(trl.__file__).parent.parent}); model {args.model}; {cfg}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            base = build_tiny_model(Path(tmp) / "tiny")
        else:
            base = DEFAULT_MODEL if args.model == "packaged" else args.model
        rows = [run("reclm", base, train, test, cfg, args.trl_ref), run("trl", base, train, test, cfg, args.trl_ref)]

    print()
    print(
        f"{'trainer':8} {'steps':>5} {'s/step':>8} {'1st step s':>10} {'total s':>8} {'loss':>8} "
        f"{'loss(5)':>8} {'acc':>6} {'margin':>8} {'thr':>3}"
    )
    for r in rows:
        print(
            f"{r['side']:8} {r['steps']:5d} {r['s_per_step']:8.3f} {r['first_step_s']:10.2f} {r['total_s']:8.1f} "
            f"{r['final_loss']:8.4f} {r['last5_loss']:8.4f} {r['accuracy']:6.3f} {r['margin']:8.4f} {r['threads']:3d}"
        )
    print(f"\ntrl/reclm seconds per step: {rows[1]['s_per_step'] / rows[0]['s_per_step']:.2f}")
    print(
        f"glue lines, triples -> trained adapter: reclm {code_lines(reclm_glue)}, trl {code_lines(trl_glue)} "
        "(function bodies, imports included, ruff-formatted)"
    )
    print("(s/step: end of step 1 to end of the last step, divided by steps - 1; 1st step s includes loading)")


if __name__ == "__main__":
    main()
