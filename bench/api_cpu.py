"""The API edge's CPU cost: CPU milliseconds per create and per poll on a `serve --api-only` node.

    python bench/api_cpu.py [--requests 2000] [--clients 8] [--json out.json]

A throwaway PostgreSQL (tests/support/pg.py), one `serve --api-only` node with no workers (creates only
queue: the cost measured is the edge's, not generation), and this process as the load generator. CPU is
the node's own utime + stime from /proc over the requests (all its threads), divided by their count.
Creates: Replicate model predictions and the relay's /vmodel/generate, half each; polls: GET of those jobs.
Goal (issue 24): <= 1.5 ms per create, <= 0.5 ms per poll. Loopback on this machine; not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import KEY, free_port, start_server

FLUXSERVE = str(Path(sys.executable).with_name("fluxserve"))
AUTH = {"Authorization": f"Bearer {KEY}"}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run(n: int, clients: int, work: Path) -> dict[str, Any]:
    from tests.support.pg import cluster, new_database

    with cluster() as server:
        db = new_database(server).replace("postgresql+psycopg://", "postgresql://")
        subprocess.run([FLUXSERVE, "db", "upgrade", "--database", db], check=True, capture_output=True)
        port = free_port()
        (work / "api").mkdir()
        storage = f"file://{work / 'storage'}"
        env_limits = {"FLUXSERVE_RPM_PER_KEY": "0", "FLUXSERVE_MAX_QUEUED_PER_KEY": "0"}
        os.environ.update(env_limits)
        proc = start_server(work / "api" / "data", port, "--database", db, "--api-only", "--storage", storage)
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(timeout=30, headers=AUTH, limits=httpx.Limits(max_connections=clients)) as client:

                def create(i: int) -> str:
                    if i % 2:
                        body = {"input": {"prompt": f"p{i}", "num_inference_steps": 4}}
                        resp = client.post(f"{url}/v1/models/black-forest-labs/flux-dev/predictions", json=body)
                    else:
                        body = {"model": "flux-schnell", "input": {"prompt": f"p{i}"}}
                        resp = client.post(f"{url}/vmodel/generate", json=body)
                    resp.raise_for_status()
                    return f"{'r' if i % 2 else 'v'}:{resp.json()['id']}"

                def poll(ref: str) -> None:
                    kind, job_id = ref.split(":", 1)
                    path = f"/v1/predictions/{job_id}" if kind == "r" else f"/vmodel/feed/{job_id}"
                    client.get(f"{url}{path}").raise_for_status()

                with ThreadPoolExecutor(clients) as pool:
                    list(pool.map(create, range(50)))  # warm: imports, pools, caches
                    before, start = cpu_s(proc.pid), time.perf_counter()
                    refs = list(pool.map(create, range(n)))
                    create_cpu, create_wall = cpu_s(proc.pid) - before, time.perf_counter() - start
                    before, start = cpu_s(proc.pid), time.perf_counter()
                    list(pool.map(poll, refs))
                    poll_cpu, poll_wall = cpu_s(proc.pid) - before, time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait(30)
    return {
        "requests": n,
        "clients": clients,
        "create_cpu_ms": round(create_cpu * 1000 / n, 3),
        "create_per_s": round(n / create_wall, 1),
        "poll_cpu_ms": round(poll_cpu * 1000 / n, 3),
        "poll_per_s": round(n / poll_wall, 1),
        "goal": {"create_cpu_ms": 1.5, "poll_cpu_ms": 0.5},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = {"machine": os.uname().nodename, "cpus": os.cpu_count(), **run(args.requests, args.clients, Path(tmp))}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
