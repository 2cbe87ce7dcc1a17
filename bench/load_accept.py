"""Accept latency under a burst: N clients each create one smallest-size task at once and poll it to the end.

Loopback only, bounded in count (``--clients``) and time (``--deadline``). Not part of the test suite.
Prints accept p50/p95/max, the slowest /health seen while the burst ran, and how many jobs succeeded.
Issue 10's goal on the 2-core dev machine (demo model, 200 clients): p50 <= 0.3 s, p95 <= 1.0 s,
/health never slower than 1 s, 200/200 succeed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx

from _common import KEY, free_port, start_server, stop_server

BODY = {"prompt": "load", "width": 256, "height": 256, "steps": 1, "output_format": "jpeg"}


async def _client(http: httpx.AsyncClient, accept: list[float], ok: list[bool], deadline: float) -> None:
    t0 = time.perf_counter()
    resp = await http.post("/v1/flux-dev", json=BODY)
    accept.append(time.perf_counter() - t0)
    if resp.status_code != 200:
        ok.append(False)
        return
    job_id = resp.json()["id"]
    while time.time() < deadline:
        await asyncio.sleep(0.5)
        try:
            r = await http.get("/v1/get_result", params={"id": job_id})
        except httpx.TransportError:  # a keep-alive connection the server closed as it was reused: poll again
            continue
        if r.status_code == 200 and r.json()["status"] in ("Ready", "Error"):
            ok.append(r.json()["status"] == "Ready")
            return
    ok.append(False)


def _probe_health(url: str, out: Queue[float], stop: Event) -> None:
    """In its own process, so the clients' event loop does not delay (or flatter) what it measures."""
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            http.get("/health")
            out.put(time.perf_counter() - t0)
            time.sleep(0.1)


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by a process (None: this one)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _burst(url: str, clients: int, deadline_s: float, server_pid: int | None = None) -> dict[str, float | int]:
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    timeout = httpx.Timeout(deadline_s)
    async with httpx.AsyncClient(base_url=url, headers={"x-key": KEY}, limits=limits, timeout=timeout) as http:
        accept: list[float] = []
        ok: list[bool] = []
        seen: Queue[float] = multiprocessing.Queue()
        stop = multiprocessing.Event()
        prober = multiprocessing.Process(target=_probe_health, args=(url, seen, stop), daemon=True)
        prober.start()
        deadline = time.time() + deadline_s
        t0 = time.perf_counter()
        cpu0 = (_cpu_s(None), _cpu_s(server_pid) if server_pid else 0.0)
        creates = [asyncio.create_task(_client(http, accept, ok, deadline)) for _ in range(clients)]
        while len(accept) < clients and not all(t.done() for t in creates):
            await asyncio.sleep(0.01)
        burst_s = time.perf_counter() - t0
        cpu1 = (_cpu_s(None), _cpu_s(server_pid) if server_pid else 0.0)
        await asyncio.gather(*creates)
        total = time.perf_counter() - t0
        stop.set()
        prober.join(35)
    health = []
    while not seen.empty():
        health.append(seen.get())
    accept.sort()
    return {
        "clients": clients,
        "accept_p50_s": round(statistics.median(accept), 3),
        "accept_p95_s": round(accept[int(0.95 * (len(accept) - 1))], 3),
        "accept_max_s": round(accept[-1], 3),
        "health_max_s": round(max(health), 3),
        "health_probes": len(health),
        "succeeded": sum(ok),
        "all_done_s": round(total, 1),
        # Where the 2 cores went until the last create was answered (the server's includes its worker).
        "burst_s": round(burst_s, 2),
        "burst_cpu_client_s": round(cpu1[0] - cpu0[0], 2),
        "burst_cpu_server_s": round(cpu1[1] - cpu0[1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds before the clients give up")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_server(Path(tmp) / "data", port)
        try:
            result = asyncio.run(_burst(f"http://127.0.0.1:{port}", args.clients, args.deadline, proc.pid))
        finally:
            stop_server(proc)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
