"""Profiles/s of the fast backend (CTranslate2 int8) against plain transformers, on the same prompts, in one process.

    python benchmarks/generation_speed.py                         # ml-100k user + item prompts, base SmolLM2
    python benchmarks/generation_speed.py --adapter RUN/sft/adapter --prompts 64
    python benchmarks/generation_speed.py --dataset mind --side user --prompts 48

Prompts are built as a run's (reclm.llm.prompts with `reclm run`'s default budget, train history only),
a seeded sample of ``--prompts`` users and items. Both backends get the same prompts and decoding parameters
(greedy, one line, ``--max-new-tokens``); the converted CT2 model is built before timing. Each backend is run
``--repeat`` times, alternating, and the best time is kept (other jobs share the CPU: the ratio of runs taken
side by side is the robust number). The last lines extrapolate to the dataset's full profile job.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def build_prompts(
    dataset: str,
    side: str,
    n: int,
    seed: int,
    max_items: int,
    max_words: int,
    style: str = "compact",
    profiles: int = 0,
    neighbours: int = 1,
) -> list[str]:
    from reclm.data.loaders import load_dataset
    from reclm.data.split import SplitSpec, make_split
    from reclm.llm.prompts import PromptBudget, item_prompts, user_prompts

    data = load_dataset(dataset)
    split = make_split(data, SplitSpec())
    budget = PromptBudget(
        max_items=max_items, max_words=max_words, max_profiles=profiles, max_neighbours=neighbours, style=style
    )
    rng = np.random.default_rng(seed)
    prompts: list[str] = []
    sides = ["user", "item"] if side == "both" else [side]
    per_side = n // len(sides)
    if "user" in sides:
        users = rng.choice(data.n_users, min(per_side, data.n_users), replace=False)
        prompts += list(user_prompts(data, split, users.tolist(), budget).values())
    if "item" in sides:
        # item prompts show the profiles of users who interacted and of related items: a fixed, realistic
        # profile for each, and seeded random items as the related ones
        profile = "User identity: Student, Movie lover, Night owl; User interests: Drama, Comedy, 1990s movies."
        user_profiles = {u: profile for u in range(data.n_users)}
        item_profiles = {i: profile for i in range(data.n_items)}
        related = {i: rng.choice(data.n_items, max(neighbours, 1)).tolist() for i in range(data.n_items)}
        items = rng.choice(data.n_items, min(n - len(prompts), data.n_items), replace=False)
        chosen = item_prompts(data, split, items.tolist(), user_profiles, item_profiles, related, budget)
        prompts += list(chosen.values())
    return prompts


def timed(generator, prompts, params) -> tuple[float, int, list[str]]:
    before = generator.new_tokens
    start = time.perf_counter()
    texts = generator.generate(prompts, params)
    return time.perf_counter() - start, generator.new_tokens - before, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--side", default="both", choices=["user", "item", "both"])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16, help="ct2 batch size")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--quantization", default="int8")
    parser.add_argument("--max-items", type=int, default=6, help="history items per user prompt")
    parser.add_argument("--max-words", type=int, default=30)
    parser.add_argument("--style", default="compact", choices=["compact", "paper"], help="prompt layout")
    parser.add_argument("--max-profiles", type=int, default=0, help="user profiles per item prompt")
    parser.add_argument("--max-neighbours", type=int, default=1, help="related items (with a profile) per item prompt")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-hf", action="store_true", help="time the fast backend only")
    parser.add_argument("--full", type=int, default=None, help="profiles of the full job [943 + 1682 on ml-100k]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the numbers here too")
    args = parser.parse_args()

    from reclm.llm.chat import prompt_ids
    from reclm.llm.generation import DecodeParams
    from reclm.llm.generation.ct2 import CT2Generator
    from reclm.llm.generation.hf import TransformersGenerator
    from reclm.utils import available_cores, torch_threads

    threads = torch_threads(args.threads)
    prompts = build_prompts(
        args.dataset,
        args.side,
        args.prompts,
        args.seed,
        args.max_items,
        args.max_words,
        args.style,
        args.max_profiles,
        args.max_neighbours,
    )
    params = DecodeParams(max_new_tokens=args.max_new_tokens)
    fast = CT2Generator(args.model, args.adapter, args.quantization, args.batch_size, threads=threads)
    lengths = [len(x) for x in prompt_ids(fast.tokenizer, prompts)]
    load = os.getloadavg()[0]
    print(f"{len(prompts)} {args.dataset} prompts ({args.side}), {np.mean(lengths):.0f} tokens on average "
          f"(min {min(lengths)}, max {max(lengths)}); {threads} threads of {available_cores()} cores; "
          f"load average {load:.1f}; {platform.processor() or platform.machine()}")  # fmt: skip
    reference = None if args.skip_hf else TransformersGenerator(args.model, args.adapter, args.hf_batch_size)
    fast.generate(prompts[:2], params)  # warm-up (model load, static prefix)
    best: dict[str, tuple[float, int]] = {}
    outputs: dict[str, list[str]] = {}
    for _ in range(args.repeat):
        for name, generator in (("ct2", fast), ("transformers", reference)):
            if generator is None:
                continue
            seconds, new, texts = timed(generator, prompts, params)
            outputs[name] = texts
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, new)
            print(f"  {name:12s} {seconds:7.1f} s  {len(prompts) / seconds:6.2f} profiles/s  {new / seconds:6.1f} "
                  f"new tok/s  ({new / len(prompts):.1f} new tokens per profile)", flush=True)  # fmt: skip
    result: dict[str, object] = {
        "prompts": len(prompts),
        "mean_prompt_tokens": float(np.mean(lengths)),
        "threads": threads,
        "load_average": load,
        "args": vars(args),
    }
    for name, (seconds, new) in best.items():
        result[name] = {"seconds": seconds, "profiles_per_s": len(prompts) / seconds, "new_tokens_per_s": new / seconds}
        print(f"{name:12s} best: {len(prompts) / seconds:.2f} profiles/s, {new / seconds:.1f} new tokens/s")
    if "transformers" in best:
        ratio = best["transformers"][0] / best["ct2"][0]
        same = sum(a == b for a, b in zip(outputs["ct2"], outputs["transformers"]))
        result["speedup"] = ratio
        result["identical_outputs"] = same
        print(f"ct2 / transformers speed-up: {ratio:.2f}x  (identical greedy outputs: {same}/{len(prompts)}; "
              f"int8 vs fp32 differ in places)")  # fmt: skip
    full = args.full or (943 + 1682 if args.dataset == "ml-100k" else None)
    if full:
        rate = len(prompts) / best["ct2"][0]
        result["full_job"] = {"profiles": full, "minutes": full / rate / 60}
        print(f"full job: {full} profiles at {rate:.2f}/s -> {full / rate / 60:.1f} minutes")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
