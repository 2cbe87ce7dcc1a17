"""Across processes on PostgreSQL: how soon a waiting API node sees a worker's commit, and how soon a worker
picks up a new job.

    python bench/notify_latency.py [--jobs 200] [--pickups 30] [--json out.json]

Starts a throwaway PostgreSQL (tests/support/pg.py; or FLUXSERVE_TEST_DATABASE_URL) on loopback.
  completion notice: this process is the API node (JobService + the LISTEN task, as `serve` wires them)
    with a waiter on each job; a second process is the worker, which claims and completes the job and
    reports when its commit returned. Latency = waiter woke with the terminal job - worker's commit. Run
    once with LISTEN and once without (the 0.5 s re-read every waiter falls back to), for the ratio.
  pickup: a real `fluxserve worker --demo` (procrastinate, LISTEN on its queue) idle, one job submitted
    at a time: the job's `started` event - its `submitted` event.
Loopback figures on this machine; never part of the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _worker_side(url: str, inbox: Any, outbox: Any) -> None:
    from fluxserve.job import Output
    from fluxserve.jobs import JobService
    from fluxserve.migrations import open_store
    from fluxserve.queue.pg.rows import PgHooks

    store = open_store(url, queue=PgHooks(url))
    jobs = JobService(store)
    while (job_id := inbox.get()) is not None:
        job = jobs.claim_id(job_id, "bench-worker")
        assert job is not None
        assert jobs.complete(job, [Output(f"{job_id}/out-0.png", 1, 64, 64, "png")])
        outbox.put(time.time())  # the commit has returned
    jobs.close()
    store.close()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _summary(ms: list[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(_pct(ms, 0.95), 2),
        "p99_ms": round(_pct(ms, 0.99), 2),
        "max_ms": round(max(ms), 2),
    }


async def _completion(url: str, n: int, use_listen: bool) -> list[float]:
    from fluxserve.jobs import JobService
    from fluxserve.migrations import open_store
    from fluxserve.models import ModelRegistry
    from fluxserve.queue.listen import listen
    from fluxserve.queue.pg.rows import PgHooks

    store = open_store(url, queue=PgHooks(url))
    jobs = JobService(store)
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_worker_side, args=(url, inbox, outbox))
    proc.start()
    listener = None
    if use_listen:
        ready = asyncio.Event()
        listener = asyncio.create_task(listen(url, lambda job_id, _e: jobs.wake(job_id), ready))
        await asyncio.wait_for(ready.wait(), 10)
    spec = ModelRegistry.default().get("flux-schnell").make_spec(prompt="p", width=256, height=256, seed=1)
    latencies = []
    for _ in range(n):
        job = await asyncio.to_thread(jobs.submit_sync, "bench", "vmodel", spec, {})
        seen: list[float] = []

        async def wait(job_id: str = job.id, seen: list[float] = seen) -> None:
            async for current in jobs.watch(job_id, "bench", timeout=30):
                if current.status.is_terminal:
                    seen.append(time.time())

        waiter = asyncio.create_task(wait())
        await asyncio.sleep(0.02)  # the waiter is parked on its event
        inbox.put(job.id)
        committed = await asyncio.to_thread(outbox.get)
        await waiter
        latencies.append((seen[0] - committed) * 1000)
    inbox.put(None)
    proc.join(30)
    if listener is not None:
        listener.cancel()
    jobs.close()
    store.close()
    return latencies


def _pickup(url: str, n: int, data_dir: Path) -> list[float]:
    from fluxserve.jobs import JobService
    from fluxserve.migrations import open_store
    from fluxserve.models import ModelRegistry
    from fluxserve.queue.pg.rows import PgHooks

    store = open_store(url, queue=PgHooks(url))
    jobs = JobService(store)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXSERVE_")} | {"HF_HUB_OFFLINE": "1"}
    fluxserve = str(Path(sys.executable).with_name("fluxserve"))
    cmd = [
        fluxserve,
        "worker",
        "--demo",
        "--device",
        "cpu",
        "--models",
        "flux-schnell",
        "--database",
        url,
        "--data-dir",
        str(data_dir),
    ]
    log = open(data_dir / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    spec = ModelRegistry.default().get("flux-schnell").make_spec(prompt="p", width=256, height=256, seed=1, steps=1)
    try:
        warm = jobs.submit_sync("bench", "vmodel", spec, {})  # the first waits for the model to load
        while not jobs.store.get_job(warm.id).status.is_terminal:  # type: ignore[union-attr]
            time.sleep(0.1)
        out = []
        for _ in range(n):
            job = jobs.submit_sync("bench", "vmodel", spec, {})
            while not jobs.store.get_job(job.id).status.is_terminal:  # type: ignore[union-attr]
                time.sleep(0.02)
            at = {e.kind.value: e.at for e in jobs.store.events(job.id)}
            out.append((at["started"] - at["submitted"]) * 1000)
            time.sleep(0.1)  # idle again, LISTENing
        return out
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
        jobs.close()
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--polled", type=int, default=40, help="jobs for the no-LISTEN comparison")
    ap.add_argument("--pickups", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from tests.support.pg import cluster, new_database

    from fluxserve.migrations import upgrade
    from fluxserve.store import Store

    with cluster() as base:
        url = new_database(base)
        store = Store(url)
        upgrade(store.engine)
        store.close()
        listen_ms = asyncio.run(_completion(url, args.jobs, use_listen=True))
        poll_ms = asyncio.run(_completion(url, args.polled, use_listen=False))
        with tempfile.TemporaryDirectory() as tmp:
            pickup_ms = _pickup(url, args.pickups, Path(tmp)) if args.pickups else []
    result: dict[str, Any] = {
        "completion_notice_listen": _summary(listen_ms),
        "completion_notice_poll_only": _summary(poll_ms),
        "ratio_p95_poll_over_listen": round(_pct(poll_ms, 0.95) / _pct(listen_ms, 0.95), 1),
    }
    if pickup_ms:
        result["pickup_idle_worker"] = _summary(pickup_ms)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
