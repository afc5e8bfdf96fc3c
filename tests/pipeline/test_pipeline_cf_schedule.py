"""The CF executors' scheduling: a profile run starts only once the text run it starts from is committed."""

import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import pytest

from reclm.pipeline.cf_jobs import CFJob, chain_costs, in_dependency_order, schedule


def job(name: str, after: str | None = None) -> CFJob:
    return CFJob(name, {}, Path(name), after=after)


JOBS = [job("lightgcn-text+profiles", "lightgcn-text"), job("lightgcn-text"), job("sgl-text+profiles", "sgl-text")]
JOBS.append(job("sgl-text"))


def run_on_threads(
    jobs: list[CFJob], seconds: dict[str, float], slots: int | None = None, priority: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    """Schedule ``jobs`` on a real two-thread pool; each sleeps ``seconds[name]``. Returns the event log."""
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(name: str) -> str:
        with lock:
            events.append(("start", name))
        time.sleep(seconds.get(name, 0.01))
        return name

    def committed(finished: CFJob, future) -> None:
        assert future.result() == finished.name
        with lock:
            events.append(("commit", finished.name))

    with ThreadPoolExecutor(max_workers=2) as pool:
        schedule(
            jobs,
            submit=lambda j: pool.submit(work, j.name),
            wait_any=lambda futures: wait(futures, return_when=FIRST_COMPLETED)[0],
            on_finished=committed,
            running={},
            slots=slots,
            priority=priority,
        )
    return events


def test_a_dependent_job_starts_after_its_text_run_is_committed_and_others_do_not_wait():
    events = run_on_threads(JOBS, {"lightgcn-text": 0.05, "sgl-text": 0.3})
    assert sorted(name for kind, name in events if kind == "commit") == sorted(j.name for j in JOBS)
    for dependent, text in (("lightgcn-text+profiles", "lightgcn-text"), ("sgl-text+profiles", "sgl-text")):
        assert events.index(("commit", text)) < events.index(("start", dependent))
    # lightgcn's profile run does not wait for the slower sgl text run
    assert events.index(("start", "lightgcn-text+profiles")) < events.index(("commit", "sgl-text"))


def test_a_job_whose_text_run_is_not_in_the_batch_starts_at_once():
    events = run_on_threads([job("sgl-text+profiles", "sgl-text")], {})  # its text run is done already
    assert events == [("start", "sgl-text+profiles"), ("commit", "sgl-text+profiles")]


def test_one_by_one_order_puts_text_runs_first():
    names = [j.name for j in in_dependency_order(JOBS)]
    assert names.index("lightgcn-text") < names.index("lightgcn-text+profiles")
    assert names.index("sgl-text") < names.index("sgl-text+profiles")


def test_a_cycle_is_refused_rather_than_waiting_forever():
    with pytest.raises(RuntimeError, match="never start"):
        run_on_threads([job("a", "b"), job("b", "a")], {})


def test_chain_costs_add_the_costliest_chain_waiting_for_a_job():
    cost = {"lightgcn-text": 1.0, "lightgcn-text+profiles": 1.0, "sgl-text": 3.0, "sgl-text+profiles": 3.0}
    chains = chain_costs(JOBS, lambda j: cost[j.name])
    assert chains == {"lightgcn-text": 2.0, "lightgcn-text+profiles": 1.0, "sgl-text": 6.0, "sgl-text+profiles": 3.0}


def test_with_two_slots_the_longest_chain_starts_first_and_its_dependent_jumps_the_queue():
    jobs = [job("bias-mf-text"), job("ncf-text"), job("simgcl-text"), job("simgcl-text+profiles", "simgcl-text")]
    seconds = {"bias-mf-text": 0.15, "ncf-text": 0.15, "simgcl-text": 0.05, "simgcl-text+profiles": 0.3}
    priority = chain_costs(jobs, lambda j: seconds[j.name])
    events = run_on_threads(jobs, seconds, slots=2, priority=priority)
    starts = [name for kind, name in events if kind == "start"]
    # simgcl's chain first; its profile run goes ahead of ncf-text, which was ready before it
    assert starts == ["simgcl-text", "bias-mf-text", "simgcl-text+profiles", "ncf-text"]
    # never more than two at once
    running = 0
    for kind, _ in events:
        running += 1 if kind == "start" else -1
        assert running <= 2


def test_the_cf_progress_counts_estimated_work_not_runs(monkeypatch, capsys):
    from reclm.pipeline.stages.cf import counted

    monkeypatch.setenv("RECLM_PROGRESS_SECONDS", "0")  # a line on every update
    committed = []
    costs = {"simgcl-text": 3.0, "bias-mf-text": 1.0}
    with counted(lambda job, result: committed.append(job.name), costs, "cf runs, 2 at a time") as done:
        done(job("simgcl-text"), None)
        done(job("bias-mf-text"), None)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cf runs")]
    assert committed == ["simgcl-text", "bias-mf-text"]
    assert "estimated work %: 75/100 (75%)  1/2 runs done" in lines[0]
    assert "about" in lines[0]  # time left from the work done, not from one run of two
    assert "100/100 (100%)  2/2 runs done" in lines[-1]
