"""Upstream providers: what a hop costs, and how many upstream tasks one worker holds at once.

    python bench/upstream_hop.py [--requests 50] [--in-flight 200] [--hold-s 20] [--json out.json]

hop: fluxserve B (`serve --demo`) answers directly, and through fluxserve A, which routes flux-2-klein-4b to
  B as an upstream: kind "openai" (one synchronous call) and kind "bfl" (submit, then poll every 0.1 s).
  Sequential OpenAI-SDK-shaped requests at 256x256; p50/p95 of the client's wall time and the ratio to B.
in flight: one `fluxserve worker --upstreams-only` (PostgreSQL, a throwaway cluster from
  tests/support/pg.py) with max_in_flight = N, against a stub fal queue server that holds every request
  IN_PROGRESS for --hold-s seconds. N jobs are submitted through a `serve --api-only` node; reported: the
  most tasks the stub saw in progress at once, the worker's peak threads and RSS, and the wall time for all.
Loopback figures on this machine; never part of the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import KEY, free_port, start_server

FLUXSERVE = str(Path(sys.executable).with_name("fluxserve"))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1), "p95_ms": round(_pct(ms, 0.95), 1)}


def _generate(url: str, n: int) -> list[float]:
    body = {"model": "flux-2-klein-4b", "prompt": "a lighthouse", "size": "256x256", "response_format": "b64_json"}
    times = []
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        warm = client.post(f"{url}/v1/images/generations", json=body)
        if warm.status_code != 200:
            raise SystemExit(f"{url}: {warm.status_code} {warm.text}")
        for _ in range(n):
            start = time.perf_counter()
            client.post(f"{url}/v1/images/generations", json=body).raise_for_status()
            times.append(time.perf_counter() - start)
    return times


def hop(requests: int, work: Path) -> dict[str, Any]:
    b_port, a_port = free_port(), free_port()
    (work / "b").mkdir()
    b = start_server(work / "b" / "data", b_port)
    b_url = f"http://127.0.0.1:{b_port}"
    try:
        rows: dict[str, Any] = {"direct": _summary(_generate(b_url, requests))}
        for kind in ("openai", "bfl"):
            toml = work / f"a-{kind}.toml"
            toml.write_text(
                f'[upstreams.b]\nkind = "{kind}"\nbase_url = "{b_url}"\napi_key_env = "B_KEY"\n'
                f'poll_interval_s = 0.1\nidempotent = true\n[models.flux-2-klein-4b]\nupstream = "b"\n'
            )
            (work / f"a-{kind}").mkdir()
            os.environ["B_KEY"] = KEY
            a = start_server(work / f"a-{kind}" / "data", a_port, "--upstream-config", str(toml))
            try:
                rows[f"via A ({kind})"] = _summary(_generate(f"http://127.0.0.1:{a_port}", requests))
            finally:
                a.terminate()
                a.wait(30)
        base = rows["direct"]["p50_ms"]
        for row in rows.values():
            row["p50_ratio_to_direct"] = round(row["p50_ms"] / base, 3)
        return rows
    finally:
        b.terminate()
        b.wait(30)


@contextmanager
def slow_fal(hold_s: float) -> Iterator[tuple[str, dict[str, int]]]:
    """fal's queue shapes; every request stays IN_PROGRESS for hold_s seconds after its submit."""
    from tests.support.images_util import png_bytes

    png = png_bytes((64, 64), (1, 2, 3))
    submitted: dict[str, float] = {}
    stats = {"peak_in_progress": 0, "submits": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            with lock:
                rid = str(len(submitted))
                submitted[rid] = time.monotonic()
                stats["submits"] += 1
            root = f"http://127.0.0.1:{port}{self.path}/requests/{rid}"
            self._send(json.dumps({"request_id": rid, "status_url": f"{root}/status", "response_url": root}).encode())

        def do_GET(self) -> None:
            if self.path == "/img.png":
                self._send(png, "image/png")
                return
            parts = self.path.split("/")
            status = parts[-1] == "status"
            rid = parts[-2] if status else parts[-1]
            now = time.monotonic()
            with lock:
                live = sum(1 for t in submitted.values() if now - t < hold_s)
                stats["peak_in_progress"] = max(stats["peak_in_progress"], live)
            if status:
                done = now - submitted[rid] >= hold_s
                self._send(json.dumps({"status": "COMPLETED" if done else "IN_PROGRESS"}).encode())
            else:
                url = f"http://127.0.0.1:{port}/img.png"
                self._send(json.dumps({"images": [{"url": url, "width": 64, "height": 64}]}).encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}", stats
    finally:
        server.shutdown()


def _proc_sample(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) // 1024


def in_flight(n: int, hold_s: float, work: Path) -> dict[str, Any]:
    from tests.support.pg import cluster, new_database

    with cluster() as server, slow_fal(hold_s) as (fal_url, stats):
        db = new_database(server).replace("postgresql+psycopg://", "postgresql://")
        subprocess.run([FLUXSERVE, "db", "upgrade", "--database", db], check=True, capture_output=True)
        toml = work / "fal.toml"
        toml.write_text(
            f'[upstreams.fal]\nkind = "fal"\nbase_url = "{fal_url}"\nmax_in_flight = {n}\npoll_interval_s = 1.0\n'
            '[models.flux-pro]\nupstream = "fal"\n'
        )
        env = {**os.environ, "FLUXSERVE_API_KEY": KEY, "FLUXSERVE_UPSTREAM_CONFIG": str(toml)}
        storage = f"file://{work / 'storage'}"
        api_port = free_port()
        (work / "api").mkdir()
        os.environ["FLUXSERVE_UPSTREAM_CONFIG"] = str(toml)
        api = start_server(work / "api" / "data", api_port, "--database", db, "--api-only", "--storage", storage)
        log = open(work / "worker.log", "wb")  # noqa: SIM115 - the process owns it
        worker = subprocess.Popen(
            [
                FLUXSERVE,
                "worker",
                "--upstreams-only",
                "--database",
                db,
                "--storage",
                storage,
                "--data-dir",
                str(work / "w"),
                "--upstream-config",
                str(toml),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            time.sleep(3)
            idle_threads, idle_rss = _proc_sample(worker.pid)
            url = f"http://127.0.0.1:{api_port}"
            start = time.monotonic()
            with httpx.Client(timeout=30, headers={"x-key": KEY}) as client:
                size = {"width": 256, "height": 256}
                create = f"{url}/v1/flux-pro"
                ids = [client.post(create, json={"prompt": str(i), **size}).json()["id"] for i in range(n)]
                peak_threads, peak_rss = idle_threads, idle_rss
                pending = set(ids)
                deadline = time.monotonic() + hold_s * 4 + 120
                while pending and time.monotonic() < deadline:
                    threads, rss = _proc_sample(worker.pid)
                    peak_threads, peak_rss = max(peak_threads, threads), max(peak_rss, rss)
                    for job_id in list(pending)[:50]:
                        got = client.get(f"{url}/v1/get_result", params={"id": job_id}).json()
                        if got["status"] != "Pending":
                            pending.discard(job_id)
                    time.sleep(0.5)
            return {
                "jobs": n,
                "hold_s": hold_s,
                "peak_upstream_in_progress": stats["peak_in_progress"],
                "upstream_submits": stats["submits"],
                "unfinished": len(pending),
                "wall_s": round(time.monotonic() - start, 1),
                "worker_threads_idle": idle_threads,
                "worker_threads_peak": peak_threads,
                "worker_rss_mb_idle": idle_rss,
                "worker_rss_mb_peak": peak_rss,
            }
        finally:
            worker.terminate()
            worker.wait(60)
            api.terminate()
            api.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--hold-s", type=float, default=20.0)
    parser.add_argument("--skip-hop", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(os.environ.get("BENCH_WORK") or tmp)
        report: dict[str, Any] = {"machine": os.uname().nodename, "cpus": os.cpu_count()}
        if not args.skip_hop:
            (work / "hop").mkdir()
            report["hop"] = hop(args.requests, work / "hop")
        if args.in_flight:
            (work / "flight").mkdir()
            report["in_flight"] = in_flight(args.in_flight, args.hold_s, work / "flight")
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
