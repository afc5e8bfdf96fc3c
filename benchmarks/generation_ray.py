"""Profiles/s of profile generation in this process against sharded over Ray actors (1 and 2 by default), on the
same ml-100k prompts, the same backend and the same chunks (reclm.llm.generation.ray_runner).

    python benchmarks/generation_ray.py                            # 32 user prompts, ct2 int8, packaged SmolLM2
    python benchmarks/generation_ray.py --backend transformers --prompts 64 --workers 1,2,4

Every configuration uses all the cores: the local generator gets ``cores`` threads, each of N actors
``cores / N`` (CPUs and threads). Each run generates every prompt (a fresh cache each time) through
``generate_texts``, so the Ray figure includes shipping shards and the driver's cache writes; the actors' start
(Ray, then the model loaded in each) is timed apart, as it is paid once per stage, not per profile. For each
actor count, local and Ray runs alternate (``--repeat``, best of each kept: other jobs on the machine move the
numbers); prints both rates, the ratio Ray / local, and whether the texts agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_speed import build_prompts  # noqa: E402

from reclm.distributed import ray_session  # noqa: E402
from reclm.llm.generation import DecodeParams, GenerationCache, generate_texts, make_generator  # noqa: E402
from reclm.llm.generation.ray_runner import GeneratorSpec, RayGenerator  # noqa: E402
from reclm.utils import available_cores  # noqa: E402


def timed_run(generator, prompts, params, chunk_size: int) -> tuple[float, list]:
    with tempfile.TemporaryDirectory() as folder:
        cache = GenerationCache(Path(folder) / "gen.sqlite")
        start = time.perf_counter()
        texts, stats = generate_texts(generator, prompts, params, cache, chunk_size=chunk_size, progress=False)
        seconds = time.perf_counter() - start
        cache.close()
    assert stats.generated == len(set(prompts)), stats
    return seconds, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--side", default="user", choices=["user", "item", "both"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--backend", default="ct2", choices=["ct2", "transformers"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--quantization", default="int8", help="ct2 precision")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=8, help="prompts per shard (and per local chunk)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--workers", default="1,2", help="actor counts to time")
    parser.add_argument("--cores", type=int, default=None, help="cores for every configuration [all]")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each, alternating")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cores = args.cores or available_cores()
    prompts = build_prompts(args.dataset, args.side, args.prompts, args.seed, max_items=6, max_words=30)
    params = DecodeParams(max_new_tokens=args.max_new_tokens)
    options = {"quantization": args.quantization} if args.backend == "ct2" else {}
    print(f"{len(prompts)} {args.dataset} {args.side} prompts, {args.backend} on {args.model}, {cores} cores, "
          f"shards of {args.chunk_size}, load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip

    local = make_generator(args.backend, args.model, args.adapter, args.batch_size, threads=cores, **options)
    local.generate(prompts[:2], params)  # warm-up: model load (and CT2 conversion) outside the timing
    spec = GeneratorSpec(args.backend, args.model, args.adapter, args.batch_size, options)
    start = time.perf_counter()
    with ray_session(None, cores):
        print(f"  (local Ray started in {time.perf_counter() - start:.1f} s)", flush=True)
        for workers in [int(w) for w in args.workers.split(",")]:
            each = cores / workers
            start = time.perf_counter()
            with RayGenerator(spec, workers=workers, cpus_per_worker=each) as pool:
                pool.pids()  # every actor up, its model loaded
                ready = time.perf_counter() - start
                pool.generate(prompts[:2], params)  # warm-up, as for local
                best = {"local": float("inf"), "ray": float("inf")}
                for _ in range(args.repeat):  # alternating, best of each: other jobs share the cores
                    seconds, reference = timed_run(local, prompts, params, args.chunk_size)
                    best["local"] = min(best["local"], seconds)
                    seconds, texts = timed_run(pool, prompts, params, args.chunk_size)
                    best["ray"] = min(best["ray"], seconds)
            same = sum(a == b for a, b in zip(texts, reference))
            local_rate, rate = len(prompts) / best["local"], len(prompts) / best["ray"]
            print(f"  local, {cores} threads: {local_rate:5.2f} profiles/s | ray, {workers} actor(s) x "
                  f"{max(1, int(each))} thread(s): {rate:5.2f} profiles/s | ray/local {rate / local_rate:.2f}x "
                  f"(best of {args.repeat}; actors up in {ready:.1f} s; same texts: {same}/{len(prompts)})",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
