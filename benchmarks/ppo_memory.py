"""Peak memory and time of PPO steps with and without ``micro_batch_tokens`` (pieces of a mini-batch).

Each setting runs in its own process (peak RSS is per process): the packaged SmolLM2-135M as policy (LoRA)
and frozen reference, ``--batch`` prompts of about ``--prompt-tokens`` tokens (MIND's RL prompts: 208 on
average, 938 at most), ``--new-tokens`` sampled tokens, a length reward. The RL stage also holds a reward
model (one more 135M model, no gradients): add its ~0.6 GB to compare with a pipeline run.

    python benchmarks/ppo_memory.py --batch 8 --prompt-tokens 768 --new-tokens 64

prints, per setting, the RSS before the first step, the peak, and seconds per step, then the ratios of the
pieces run to the whole-batch run (the baseline, same process tree, same machine).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

WORDS = ["user", "clicked", "news", "about", "football", "elections", "weather", "markets", "travel", "music"]


def synthetic_prompts(tokenizer, count: int, tokens: int) -> list[str]:
    """``count`` distinct prompts of about ``tokens`` tokens each."""
    prompts = []
    for k in range(count):
        words = [WORDS[(k + 3 * i) % len(WORDS)] for i in range(tokens)]
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:tokens]
        prompts.append(f"User {k}: " + tokenizer.decode(ids))
    return prompts


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def measure(args: argparse.Namespace, micro: int | None) -> dict:
    """Run in this process: load, then ``args.steps`` PPO steps; RSS and time."""
    import torch

    from reclm.llm.rl.common import load_policy, load_reference
    from reclm.llm.rl.ppo import PPOConfig, PPOTrainer
    from reclm.pipeline.memory import process_status_mb

    torch.manual_seed(0)
    policy, tokenizer = load_policy(args.model, lora={"r": 8, "alpha": 16})
    reference = load_reference(args.model)
    prompts = synthetic_prompts(tokenizer, args.batch, args.prompt_tokens)
    config = PPOConfig(batch_size=args.batch, max_new_tokens=args.new_tokens, micro_batch_tokens=micro, seed=0, lr=1e-5)
    trainer = PPOTrainer(policy, reference, tokenizer, lambda p, r, ids: [len(x) / 64 for x in ids], config)
    loaded = (process_status_mb("VmRSS") or 0.0) * 1024 / 1e6  # KiB / 1e6, as peak_gb
    started = time.perf_counter()
    stats = [trainer.step(prompts) for _ in range(args.steps)]
    seconds = (time.perf_counter() - started) / args.steps
    return {
        "micro_batch_tokens": micro,
        "loaded_gb": round(loaded, 2),
        "peak_gb": round(peak_gb(), 2),
        "s_per_step": round(seconds, 1),
        "width": args.prompt_tokens + args.new_tokens,
        "last_pg_loss": stats[-1]["pg_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=768)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--micro", type=int, default=2048, help="micro_batch_tokens of the pieces run")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one setting
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args, None if args.one == "none" else int(args.one))))
        return
    results = []
    for micro in ("none", str(args.micro)):
        command = [sys.executable, __file__, *sys.argv[1:], "--one", micro]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    whole, pieces = results
    grown = (pieces["peak_gb"] - pieces["loaded_gb"]) / (whole["peak_gb"] - whole["loaded_gb"])
    print(
        f"pieces / whole: peak memory {pieces['peak_gb'] / whole['peak_gb']:.2f}x, "
        f"above the loaded models {grown:.2f}x, "
        f"time per step {pieces['s_per_step'] / whole['s_per_step']:.2f}x"
    )


if __name__ == "__main__":
    main()
