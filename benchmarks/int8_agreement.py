"""How close CTranslate2 int8 profiles come to float32 ones on this CPU, on a finished run's own prompts and
profile writers: profiles/s of each, the share in the profile format, written identically, with the same
first three words, with an entry listed twice ("Drama, Drama"), and the MiniLM cosine of each int8 profile
to its float32 one beside the cosine of two different prompts' float32 profiles (what "unrelated" reads as).

    python benchmarks/int8_agreement.py RUN --prompts 256
    # an AMD CPU before Zen 4 (oneDNN, AVX2, no VNNI), emulated on a newer one:
    CT2_FORCE_CPU_ISA=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 CT2_USE_MKL=0 \
        python benchmarks/int8_agreement.py RUN --prompts 256

The prompts are a seeded sample of ``RUN/profiles/{users,items}.jsonl``; the writers are the run's
(``reclm.serve.runinfo.find_adapter``: users the last tuned one, items the item writer), decoded as
``RUN/profiles/generation.json`` says the run did (greedy, one line, its ``max_new_tokens``). Both
precisions run in this process, one after the other, each after a warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ISA_VARIABLES = ("CT2_FORCE_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "CT2_USE_MKL")


def sample_prompts(run: Path, side: str, n: int, seed: int) -> list[str]:
    """``n`` distinct prompts of the run's ``side`` (users | items), a seeded sample in file order."""
    rows = [json.loads(line) for line in (run / "profiles" / f"{side}.jsonl").open()]
    prompts = list(dict.fromkeys(r["prompt"] for r in rows if r.get("prompt")))
    if len(prompts) > n:
        keep = np.sort(np.random.default_rng(seed).choice(len(prompts), n, replace=False))
        prompts = [prompts[i] for i in keep]
    return prompts


def agreement(int8: list[str], float32: list[str], encoder) -> dict[str, float]:
    """How int8's texts compare with float32's, prompt by prompt."""
    from reclm.llm.prompts import parse_profile
    from reclm.llm.quality import repeats_an_entry

    a, b = encoder.encode(int8, "int8"), encoder.encode(float32, "float32")
    shifted = np.roll(b, 1, axis=0)  # another prompt's float32 profile: the cosine of unrelated texts
    return {
        "format_int8": float(np.mean([parse_profile(t) is not None for t in int8])),
        "format_float32": float(np.mean([parse_profile(t) is not None for t in float32])),
        "identical": float(np.mean([x.strip() == y.strip() for x, y in zip(int8, float32)])),
        "first_three_words": float(np.mean([x.split()[:3] == y.split()[:3] for x, y in zip(int8, float32)])),
        "repeated_entry_int8": float(np.mean([repeats_an_entry(t) for t in int8])),
        "repeated_entry_float32": float(np.mean([repeats_an_entry(t) for t in float32])),
        "cosine_to_float32": float(np.mean(np.sum(a * b, axis=1))),
        "cosine_float32_other_prompt": float(np.mean(np.sum(b * shifted, axis=1))),
    }


def timed(generator, prompts: list[str], params) -> tuple[float, list[str]]:
    generator.generate(prompts[:16], params)  # warm-up: model load, the static prefix's state
    start = time.perf_counter()
    texts = generator.generate(prompts, params)
    return time.perf_counter() - start, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run directory (with profiles/ and its adapters)")
    parser.add_argument("--prompts", type=int, default=256, help="prompts per side")
    parser.add_argument("--side", default="both", choices=["users", "items", "both"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here too")
    args = parser.parse_args()

    import yaml

    from reclm.llm.generation import DecodeParams
    from reclm.llm.generation.ct2 import CT2Generator
    from reclm.rundir import RunDir
    from reclm.serve.runinfo import find_adapter
    from reclm.text.encoder import TextEncoder

    config = yaml.safe_load((args.run / "config.yaml").read_text())
    generation = json.loads((args.run / "profiles" / "generation.json").read_text())
    run = RunDir(args.run)
    writers = {"users": find_adapter(run, "user"), "items": find_adapter(run, "item")}
    params = DecodeParams(**{k: v for k, v in json.loads(generation["params"]).items() if k != "top_k"})
    encoder = TextEncoder(show_progress=False)
    isa = {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ}
    print(f"{platform.processor() or platform.machine()}; limits {isa or 'none'}; load {os.getloadavg()[0]:.1f}")
    result: dict[str, object] = {"isa_limits": isa, "args": {k: str(v) for k, v in vars(args).items()}}
    for side in ("users", "items") if args.side == "both" else (args.side,):
        prompts = sample_prompts(args.run, side, args.prompts, args.seed)
        texts, speed = {}, {}
        for precision in ("float32", "int8"):
            generator = CT2Generator(config["llm"]["base_model"], writers[side], precision, args.batch_size)
            seconds, texts[precision] = timed(generator, prompts, params)
            speed[precision] = len(prompts) / seconds
            print(f"  {side:5s} {precision:7s} {speed[precision]:6.2f} profiles/s", flush=True)
        numbers = {
            "prompts": len(prompts),
            "profiles_per_s": speed,
            **agreement(texts["int8"], texts["float32"], encoder),
        }
        numbers["int8_speedup"] = speed["int8"] / speed["float32"]
        result[side] = numbers
        print(f"{side}: " + ", ".join(f"{k} {v:.3f}" for k, v in numbers.items() if isinstance(v, float)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
