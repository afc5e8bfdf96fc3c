"""Serving benchmarks on ml-100k: HTTP load on `GET /users/{id}/recommendations`, the FAISS threshold, cold-start
quality of folded-in users, and whether micro-batching on-the-fly profiles pays.

    python benchmarks/serve_load.py --build runs/serve-bench          # the run: `reclm run` with the config below
    python benchmarks/serve_load.py --run runs/serve-bench --load     # p50 / p99 latency and requests/s
    python benchmarks/serve_load.py --index                           # NumPy vs FAISS top-k by catalog size
    python benchmarks/serve_load.py --run runs/serve-bench --cold     # new users folded in vs trained users
    python benchmarks/serve_load.py --run runs/serve-bench --new-users 32 --clients 8   # batching on vs off

`--load` starts `reclm serve RUN --profile-backend none` in a subprocess on 127.0.0.1 and runs `--clients`
concurrent httpx clients (asyncio, one process) for `--seconds`, `--repeats` times, for `/health` (the baseline:
the same HTTP stack with no work) and for recommendations of random users. Client and server share the
machine's cores: on 2 cores the client's own CPU use is part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUILD_CONFIG = """# serve benchmark run: ml-100k, the offline teacher's profiles for every user and item
# (no LLM tuning), LightGCN with text+profiles features
dataset: ml-100k
out: {out}
stages: {{teacher: offline, sft: false, collab: false, reward: false, rl: none, item_side: false}}
teacher: {{users: null, items: null}}
cf:
  backbones: [lightgcn]
  features: [text+profiles]
  params: {{epochs: 60, eval_every: 5, patience: 4}}
"""


# ---------------------------------------------------------------- the run


def build_run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = out / "serve-bench.yaml"
    config.write_text(BUILD_CONFIG.format(out=out.resolve()))
    subprocess.run([sys.executable, "-m", "reclm.cli.main", "run", str(config)], cwd=REPO, check=True)


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, run: Path, *args: str, log: Path):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "reclm.cli.main", "serve", str(run), "--port", str(self.port), *args]
        self.log = log.open("wb")
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise TimeoutError(f"server not ready; see {log}")

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=30).json()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


# ---------------------------------------------------------------- load


async def load(url: str, paths: list[str], clients: int, seconds: float) -> dict:
    """``clients`` concurrent loops, each GETting a random path until ``seconds`` pass."""
    import httpx

    rng = np.random.default_rng(0)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: httpx.AsyncClient, seed: int) -> None:
        nonlocal errors
        local = np.random.default_rng(seed)
        while time.perf_counter() < deadline:
            path = paths[int(local.integers(len(paths)))]
            start = time.perf_counter()
            response = await client.get(path)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                errors += 1

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client, int(rng.integers(1 << 30))) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def run_load(run: Path, clients: int, seconds: float, repeats: int, k: int, faiss_min_items: int | None) -> dict:
    from reclm.rundir import RunDir

    data, _ = RunDir(run).load()
    args = ["--profile-backend", "none"]
    if faiss_min_items:
        args += ["--faiss-min-items", str(faiss_min_items)]
    server = Server(run, *args, log=run / "serve-bench.log")
    try:
        info = server.health()
        print(f"server: model {info['model']['name']}, {info['items']} items, top-k by {info['index']}")
        rec_paths = [f"/users/{u}/recommendations?k={k}" for u in data.user_ids]
        asyncio.run(load(server.url, rec_paths, clients, 2.0))  # warm-up
        results: dict[str, list[dict]] = {"health": [], "recommendations": []}
        for r in range(repeats):
            for name, paths in (("health", ["/health"]), ("recommendations", rec_paths)):
                result = asyncio.run(load(server.url, paths, clients, seconds))
                results[name].append(result)
                print(
                    f"  {r + 1}/{repeats} {name:15s} {result['rps']:7.0f} req/s  p50 {result['p50_ms']:6.2f} ms  "
                    f"p99 {result['p99_ms']:6.2f} ms  max {result['max_ms']:6.1f} ms  "
                    f"({result['requests']} requests, {result['errors']} errors)",
                    flush=True,
                )
    finally:
        server.stop()
    summary = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in results.items()}
    rec, base = summary["recommendations"], summary["health"]
    print(
        f"median of {repeats}: recommendations {rec['rps']:.0f} req/s, p50 {rec['p50_ms']:.2f} ms, "
        f"p99 {rec['p99_ms']:.2f} ms; /health {base['rps']:.0f} req/s, p50 {base['p50_ms']:.2f} ms "
        f"(throughput ratio recommendations / health: {rec['rps'] / base['rps']:.2f})"
    )
    return {"clients": clients, "seconds": seconds, "k": k, "runs": results, "median": summary}


def scoring_time(run: Path, k: int, repeats: int = 2000) -> dict:
    """The work a recommendation request does in the server (no HTTP), for comparison with its latency."""
    from reclm.serve import Recommender, ServeOptions

    engine = Recommender(run, ServeOptions(profile_backend="none"))
    users = engine.data.user_ids
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats):
        user = users[int(rng.integers(len(users)))]
        start = time.perf_counter()
        engine.recommend_user(user, k)
        times.append(time.perf_counter() - start)
    engine.close()
    us = np.array(times) * 1e6
    print(f"in-process recommend_user (k={k}): p50 {np.percentile(us, 50):.0f} us, p99 {np.percentile(us, 99):.0f} us")
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99))}


# ---------------------------------------------------------------- FAISS vs NumPy


def run_index(sizes: list[int], dim: int, k: int, n_seen: int, repeats: int) -> dict:
    """Microseconds per top-k query (``n_seen`` excluded items) by catalog size: NumPy vs FAISS IndexFlatIP, one
    thread each (the server runs one query per request thread)."""
    import faiss

    from reclm.serve.engine import limit_blas_threads
    from reclm.serve.index import GrowingMatrix, ItemIndex

    limit_blas_threads()
    rng = np.random.default_rng(0)
    rows = {}
    print(f"top-{k} per query, d={dim}, {n_seen} seen items excluded, median of {repeats} runs (microseconds):")
    print(f"{'items':>9} {'numpy':>9} {'faiss':>9} {'numpy/faiss':>12}")
    for n in sizes:
        matrix = GrowingMatrix(rng.standard_normal((n, dim)).astype(np.float32))
        numpy_index = ItemIndex(matrix, min_items=n + 1)
        faiss_index = ItemIndex(matrix, min_items=1)
        queries = rng.standard_normal((64, dim)).astype(np.float32)
        seen = [rng.choice(n, min(n_seen, n // 2), replace=False) for _ in queries]
        per_run = max(20, min(2000, int(3e6 / n)))
        timings: dict[str, list[float]] = {"numpy": [], "faiss": []}
        for _ in range(repeats):
            for name, index in (("numpy", numpy_index), ("faiss", faiss_index)):
                start = time.perf_counter()
                for q in range(per_run):
                    index.search(queries[q % 64], k, seen[q % 64])
                timings[name].append((time.perf_counter() - start) / per_run * 1e6)
        a, b = statistics.median(timings["numpy"]), statistics.median(timings["faiss"])
        rows[n] = {"numpy_us": a, "faiss_us": b}
        print(f"{n:>9} {a:>9.0f} {b:>9.0f} {a / b:>12.2f}", flush=True)
    faster = [n for n, r in rows.items() if r["faiss_us"] < r["numpy_us"]]
    print(f"faiss faster at: {faster} (faiss {faiss.__version__})")
    return rows


# ---------------------------------------------------------------- cold start quality


def run_cold(run: Path, profile_source: str = "run") -> dict:
    """Test users as if they were new: folded in from their TRAIN history (the same history the trained model
    saw) with each ID strategy, with and without their profile embedding; full-shot test Recall/NDCG@20 with
    train and validation items masked, against the trained users' own representations."""
    import torch

    from reclm.cf.metrics import topk_metrics
    from reclm.cf.trainer import load_model
    from reclm.rundir import RunDir
    from reclm.serve.reps import ID_STRATEGIES, ServingModel
    from reclm.serve.runinfo import choose_model

    rundir = RunDir(run)
    data, split = rundir.load()
    choice = choose_model(rundir)
    model = load_model(choice.folder / "model.pt")
    test = split.full_shot_test()
    seen = split.matrix(np.concatenate([split.train, split.valid])).tolil().rows
    truth = split.matrix(test).tolil().rows
    users = np.array([u for u in range(split.n_users) if truth[u] and len(split.train_histories()[u])])
    histories = split.train_histories()
    profiles = model.fusion.user_profiles.numpy() if model.fusion.mode == "text+profiles" else None

    def scorer_of(serve: ServingModel):
        if serve.dot_product:
            return lambda v: serve.items_final @ v
        return lambda v: serve.ncf_scores(v, serve.items0)

    def evaluate(user_vectors: np.ndarray, scorer) -> dict:
        hits, n_rel = [], []
        for row, u in enumerate(users):
            scores = scorer(user_vectors[row])
            scores[list(seen[u])] = -np.inf
            scores[split.zero_shot_items] = -np.inf  # full-shot candidates, as the evaluator's
            top = np.argsort(-scores)[:20]
            hits.append(np.isin(top, truth[u]))
            n_rel.append(len(truth[u]))
        metrics = topk_metrics(torch.tensor(np.array(hits)), torch.tensor(n_rel), [20])
        return {name: float(value.mean()) for name, value in metrics.items()}

    results = {}
    reference = json.loads((choice.folder / "metrics.json").read_text())["test"]
    print(
        f"model {choice.name}: {len(users)} test users, full-shot test, train+valid masked "
        f"(metrics.json test: recall@20 {reference['recall@20']:.4f}, ndcg@20 {reference['ndcg@20']:.4f})"
    )
    for strategy in ID_STRATEGIES:
        serve = ServingModel(model, split.train, split.n_users, split.n_items, id_strategy=strategy)
        score = scorer_of(serve)
        if strategy == ID_STRATEGIES[0]:
            results["trained users"] = evaluate(serve.users_final[users], score)
            print(f"  {'trained users':38s} {results['trained users']}")
        for with_profile in (True, False) if profiles is not None else (False,):
            vectors = np.concatenate(
                [
                    serve.new_users(
                        [histories[u] for u in users[s : s + 256]],
                        serve.items0,
                        profiles[users[s : s + 256]] if with_profile else None,
                    )
                    for s in range(0, len(users), 256)
                ]
            )
            name = f"new: id={strategy}, {'with' if with_profile else 'no'} profile"
            results[name] = evaluate(vectors, score)
            print(f"  {name:38s} {results[name]}", flush=True)
    return results


# ---------------------------------------------------------------- micro-batching of profile writing


async def post_new_users(url: str, histories: list[list[str]], clients: int) -> dict:
    import httpx

    queue = list(histories)
    latencies, statuses = [], []

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            history = queue.pop()
            start = time.perf_counter()
            response = await client.post("/recommendations", json={"items": history, "k": 20})
            latencies.append(time.perf_counter() - start)
            statuses.append(response.json().get("profile_status") if response.status_code == 200 else response.text)

    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "profiles_per_s": len(latencies) / elapsed,
        "p50_s": float(np.percentile(latencies, 50)),
        "max_s": float(np.max(latencies)),
        "statuses": {s: statuses.count(s) for s in set(statuses)},
    }


def run_new_users(
    run: Path, n: int, clients: int, backend: str, batch_sizes: list[int], threads: int | None, extra: list[str]
) -> dict:
    """``n`` new users (random 10-item histories, distinct per setting so the cache never answers) sent by
    ``clients`` concurrent clients, with the writer's batch size 1 (no batching) and larger."""
    from reclm.rundir import RunDir

    data, split = RunDir(run).load()
    rng = np.random.default_rng(len(batch_sizes))
    results = {}
    for batch in batch_sizes:
        histories = [[data.item_ids[i] for i in rng.choice(data.n_items, 10, replace=False)] for _ in range(n)]
        args = ["--profile-backend", backend, "--batch-size", str(batch), "--batch-wait-ms", "20", *extra]
        if threads:
            args += ["--threads", str(threads)]
        server = Server(run, *args, log=run / f"serve-bench-new-users-{batch}.log")
        try:
            asyncio.run(post_new_users(server.url, [histories.pop()], 1))  # warm-up (first generation)
            result = asyncio.run(post_new_users(server.url, histories, clients))
            result["writer"] = server.health()["profiles"]["writer"]
        finally:
            server.stop()
        results[batch] = result
        print(
            f"  batch {batch:3d}: {result['requests']} new users in {result['seconds']:.1f} s = "
            f"{result['profiles_per_s']:.2f}/s, p50 {result['p50_s']:.1f} s, max {result['max_s']:.1f} s, "
            f"statuses {result['statuses']}, largest batch {result['writer']['largest_batch']}",
            flush=True,
        )
    first, last = results[batch_sizes[0]], results[batch_sizes[-1]]
    print(f"throughput ratio batch {batch_sizes[-1]} / batch {batch_sizes[0]}: "
          f"{last['profiles_per_s'] / first['profiles_per_s']:.2f}")  # fmt: skip
    return results


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="Run directory (from `reclm run` or --build).")
    parser.add_argument("--build", type=Path, help="Build the benchmark run here first (reclm run, ml-100k).")
    parser.add_argument("--load", action="store_true", help="HTTP load on GET recommendations.")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--faiss-min-items", type=int, default=None, help="Passed to reclm serve (1: force FAISS).")
    parser.add_argument("--index", action="store_true", help="NumPy vs FAISS top-k by catalog size.")
    parser.add_argument("--sizes", default="1000,3000,10000,30000,100000,300000,1000000")
    parser.add_argument("--cold", action="store_true", help="Cold-start quality of folded-in users.")
    parser.add_argument("--new-users", type=int, default=0, help="POST this many new users (profile writing).")
    parser.add_argument("--backend", default="ct2", help="Profile backend for --new-users.")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--serve-args", default="", help="More `reclm serve` options for --new-users.")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out: dict = {"machine": {"cores": os.cpu_count(), "load_average": os.getloadavg()}}
    if args.build:
        build_run(args.build)
        args.run = args.run or args.build
    if args.index:
        sizes = [int(s) for s in args.sizes.split(",")]
        out["index"] = run_index(sizes, dim=64, k=20, n_seen=50, repeats=7)
    if (args.load or args.cold or args.new_users) and args.run is None:
        parser.error("--load, --cold and --new-users need --run (or --build)")
    if args.load:
        out["scoring"] = scoring_time(args.run, args.k)
        out["load"] = run_load(args.run, args.clients, args.seconds, args.repeats, args.k, args.faiss_min_items)
    if args.cold:
        out["cold"] = run_cold(args.run)
    if args.new_users:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        extra = args.serve_args.split() if args.serve_args else []
        out["new_users"] = run_new_users(
            args.run, args.new_users, args.clients, args.backend, sizes, args.threads, extra
        )
    out["machine"]["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    print(f"load average before/after: {out['machine']['load_average']} / {out['machine']['load_average_after']}")


if __name__ == "__main__":
    main()
