"""Profiles/s of the ``openai`` generation backend over one and over two OpenAI-compatible servers (issue 22):
the same prompts through ``base_url: URL1`` and then ``base_url: [URL1, URL2]``.

    python benchmarks/generation_endpoints.py                      # 48 ml-100k user prompts, packaged SmolLM2
    python benchmarks/generation_endpoints.py --prompts 96 --server-threads 2
    python benchmarks/generation_endpoints.py --fake-latency 0.2   # no model: a fixed delay per request

Each server is a separate process started here (``--serve PORT``, below): a small FastAPI app speaking
``POST /v1/chat/completions`` that writes with reclm's CTranslate2 backend (the packaged SmolLM2-135M, no
adapter, the default precision for this CPU), ``--server-threads`` threads each. It batches the requests that
wait while it writes (at most ``--server-batch``), as vLLM or a llama.cpp server with parallel slots would. With
``--fake-latency S`` the servers hold no model: each request sleeps S seconds and answers a fixed text, which
shows the load spreading alone (said so in the output).

Both runs send the same prompts with the same decoding (greedy, one line, ``--max-new-tokens``), straight through
``OpenAIGenerator.generate`` (no generation cache), ``--concurrency`` requests in flight per server. Both servers
run through both measurements (the second idles during the first). Machines with fewer free cores than
servers x threads cannot show the scale-out: the load average is printed.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def serve(port: int, threads: int, max_batch: int, fake_latency: float | None) -> None:
    """An OpenAI-compatible chat-completions server on 127.0.0.1:``port`` (runs until killed)."""
    import uvicorn
    from fastapi import FastAPI, Request

    from reclm.llm.generation import DecodeParams

    generator = None
    if fake_latency is None:
        from reclm.llm.generation.ct2 import CT2Generator

        generator = CT2Generator(threads=threads)
    app = FastAPI()
    app.state.writer = None
    pending: asyncio.Queue = asyncio.Queue()

    async def writer() -> None:
        """Takes what waits (up to ``max_batch`` requests with the same decoding) and writes it as one batch."""
        while True:
            batch = [await pending.get()]
            while len(batch) < max_batch and not pending.empty():
                batch.append(pending.get_nowait())
            groups: dict[DecodeParams, list] = {}
            for item in batch:
                groups.setdefault(item[1], []).append(item)
            for params, items in groups.items():
                try:
                    if generator is None:
                        await asyncio.sleep(fake_latency)
                        texts = ["User identity: Film fan; User interests: Drama, Comedy."] * len(items)
                    else:
                        texts = await asyncio.to_thread(generator.generate, [m for m, _, _ in items], params)
                except Exception as exc:  # every request of the batch gets the error
                    for _, _, future in items:
                        future.set_exception(exc)
                    continue
                for (_, _, future), text in zip(items, texts):
                    future.set_result(text)

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> dict:
        body = await request.json()
        params = DecodeParams(
            max_new_tokens=body["max_tokens"],
            temperature=body.get("temperature", 0.0),
            single_line="\n" in body.get("stop", []),
        )
        if app.state.writer is None:
            app.state.writer = asyncio.create_task(writer())
        future = asyncio.get_running_loop().create_future()
        await pending.put((body["messages"], params, future))  # the messages hold the system prompt already
        text = await future
        new = len(generator.tokenizer(text)["input_ids"]) if generator is not None else 0
        message = {"role": "assistant", "content": text}
        usage = {"prompt_tokens": 0, "completion_tokens": new}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_servers(args: argparse.Namespace, n: int) -> tuple[list[subprocess.Popen], list[str]]:
    import httpx

    processes, urls = [], []
    for _ in range(n):
        port = free_port()
        command = [sys.executable, __file__, "--serve", str(port), "--server-threads", str(args.server_threads)]
        command += ["--server-batch", str(args.server_batch)]
        if args.fake_latency is not None:
            command += ["--fake-latency", str(args.fake_latency)]
        env = {**os.environ, "RECLM_THREADS": str(args.server_threads)}
        processes.append(subprocess.Popen(command, env=env))
        urls.append(f"http://127.0.0.1:{port}/v1")
    deadline = time.time() + 300
    for url in urls:
        while True:
            try:
                if httpx.get(url.removesuffix("/v1") + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or any(p.poll() is not None for p in processes):
                raise SystemExit(f"a server did not start ({url})")
            time.sleep(0.5)
    return processes, urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48, help="ml-100k user prompts (a seeded sample)")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per server")
    parser.add_argument("--server-threads", type=int, default=1, help="CTranslate2 threads per server")
    parser.add_argument("--server-batch", type=int, default=4, help="most requests a server writes at once")
    parser.add_argument("--fake-latency", type=float, default=None, help="no model: seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the numbers here too")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one server
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.server_threads, args.server_batch, args.fake_latency)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generation_speed import build_prompts

    from reclm.llm.generation import DecodeParams
    from reclm.llm.generation.openai import OpenAIGenerator
    from reclm.utils import available_cores

    prompts = build_prompts(args.dataset, "user", args.prompts, args.seed, 6, 30)
    params = DecodeParams(max_new_tokens=args.max_new_tokens)
    what = (
        f"FAKE servers: no model, a fixed {args.fake_latency} s per request (load spreading only)"
        if args.fake_latency is not None
        else f"real servers: packaged SmolLM2-135M on reclm's CTranslate2 backend, {args.server_threads} thread(s) "
        f"each, batches of up to {args.server_batch}"
    )
    print(f"{len(prompts)} {args.dataset} user prompts, {args.max_new_tokens} new tokens at most, greedy; {what}; "
          f"{args.concurrency} requests in flight per server; {available_cores()} cores, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    processes, urls = start_servers(args, 2)
    results: dict[str, dict] = {}
    outputs: dict[int, list] = {}
    try:
        for url in urls:  # warm-up: model loaded, first batch written
            OpenAIGenerator(base_url=url, api_key_env=None).generate(prompts[:2], params)
        for n in (1, 2):
            generator = OpenAIGenerator(base_url=urls[:n], api_key_env=None, concurrency=args.concurrency)
            start = time.perf_counter()
            texts = generator.generate(prompts, params)
            seconds = time.perf_counter() - start
            outputs[n] = texts
            shares = [r.answered for r in generator.replicas]
            rate = sum(t is not None for t in texts) / seconds
            results[f"{n}_endpoints"] = {"seconds": seconds, "profiles_per_s": rate, "answered_per_server": shares}
            print(f"  {n} endpoint{'s' if n > 1 else ' '}: {seconds:6.1f} s  {rate:6.2f} profiles/s  "
                  f"{generator.new_tokens / seconds:6.1f} new tok/s  answered per server {shares}  "
                  f"failed {generator.failed}  load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
    ratio = results["2_endpoints"]["profiles_per_s"] / results["1_endpoints"]["profiles_per_s"]
    same = sum(a == b for a, b in zip(outputs[1], outputs[2]))
    results.update(ratio=ratio, identical_outputs=same, args=vars(args))
    print(f"2 endpoints / 1 endpoint: {ratio:.2f}x profiles/s; identical outputs {same}/{len(prompts)} "
          f"(a server batches other requests together in each run, and CTranslate2's batching can change a later "
          f"token; with --server-batch 1 they were identical)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
