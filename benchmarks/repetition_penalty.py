"""What a repetition penalty does to a finished run's profiles: for each penalty, on the run's own prompts and
writers (CTranslate2 at this CPU's default precision), profiles/s, the share in the profile format, the share
with an entry listed twice ("Movie lover, Movie lover"), and, where the teacher profiled the same id, the
Jaccard overlap of the entries with the teacher's and the MiniLM cosine to the teacher's profile.

Prompts: the ids the writer was not tuned on (SFT's held-out users, the item side's held-out items) when the
run generated them, else a seeded sample of the run's generated prompts (no teacher to compare with then).

    python benchmarks/repetition_penalty.py RUN --side items --penalties 1,1.05,1.1 --prompts 128
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def held_out_ids(run: Path, side: str, teacher_ids: list[str]) -> list[str]:
    """The ids the writer was not tuned on: SFT's held-out users, or the item side's held-out teacher records."""
    if side == "users":
        return [str(u) for u in json.loads((run / "sft" / "heldout.json").read_text()).get("user", [])]
    split = json.loads((run / "item_sft" / "split.json").read_text())
    return [teacher_ids[i] for i in split.get("heldout", []) if i < len(teacher_ids)]


def pick_prompts(run: Path, side: str, n: int, seed: int) -> tuple[list[str], list[str], dict[str, str], str]:
    """(ids, prompts, the teacher's profile by id, how they were picked)."""
    from reclm.llm.records import read_records

    generated = {r.id: r.prompt for r in read_records(run / "profiles" / f"{side}.jsonl") if r.prompt}
    teacher = read_records(run / "teacher" / f"{side}.jsonl")
    by_id = {r.id: r.profile for r in teacher if r.profile}
    held = [i for i in held_out_ids(run, side, [r.id for r in teacher]) if i in generated and i in by_id][:n]
    if held:
        return held, [generated[i] for i in held], by_id, "held out from tuning"
    ids = sorted(generated)
    ids = [ids[i] for i in np.random.default_rng(seed).choice(len(ids), min(n, len(ids)), replace=False)]
    return ids, [generated[i] for i in ids], {}, "a seeded sample (no teacher profile to compare)"


def entries(text: str) -> set[str]:
    from reclm.llm.prompts import parse_profile

    parsed = parse_profile(text)
    return {e.lower() for part in parsed for e in part} if parsed else set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run directory (profiles/, teacher/ and its adapters)")
    parser.add_argument("--side", choices=("users", "items"), default="users")
    parser.add_argument("--penalties", default="1,1.05,1.1")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from reclm.llm.generation import DecodeParams
    from reclm.llm.generation.ct2 import CT2Generator
    from reclm.llm.quality import compliant, repeats_an_entry, similarity
    from reclm.rundir import RunDir
    from reclm.serve.runinfo import find_adapter
    from reclm.text.encoder import TextEncoder

    ids, prompts, teacher, how = pick_prompts(args.run, args.side, args.prompts, args.seed)
    kind = "user" if args.side == "users" else "item"
    adapter = find_adapter(RunDir(args.run), kind)
    generator = CT2Generator(adapter=adapter)
    encoder = TextEncoder("all-MiniLM-L6-v2")
    refs = [teacher[i] for i in ids] if teacher else []
    print(f"{platform.processor() or platform.machine()}; {generator.quantization}; {len(ids)} {args.side}, {how}")
    for penalty in (float(p) for p in args.penalties.split(",")):
        params = DecodeParams(max_new_tokens=args.max_new_tokens, repetition_penalty=penalty)
        start = time.perf_counter()
        out = generator.generate(prompts, params)
        seconds = time.perf_counter() - start
        in_format, twice = np.mean([compliant(t) for t in out]), np.mean([repeats_an_entry(t) for t in out])
        line = (
            f"penalty {penalty:4.2f}: {len(out) / seconds:5.2f} profiles/s, in the format {in_format:.3f}, "
            f"an entry twice {twice:.3f}"
        )
        if refs:
            jaccard = np.mean(
                [len(entries(o) & entries(r)) / max(1, len(entries(o) | entries(r))) for o, r in zip(out, refs)]
            )
            line += f", entries shared with the teacher (Jaccard) {jaccard:.3f}"
            cosine = similarity(dict(zip(ids, out)), teacher, encoder, ids).get("mean_cosine", float("nan"))
            line += f", MiniLM cosine to the teacher {cosine:.4f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
