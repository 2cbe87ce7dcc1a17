"""Fair scheduling: how long one key's single task waits while another key floods the queue.

    python bench/fair_wait.py [--flood 100] [--probes 3]

Loopback only, bounded. `fluxserve serve --demo` as a subprocess with two keys: key A creates
``--flood`` BFL tasks (256x256, 2 steps) as fast as it can; then key B creates one task, waits for
it, and does so ``--probes`` times. Prints B's wait (create to Ready), the queue position B was
told at create, and how many of A's tasks had finished by then. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from _common import KEY, free_port, start_server, stop_server

BODY = {"prompt": "fair", "width": 256, "height": 256, "steps": 2, "output_format": "jpeg"}


def _done(http: httpx.Client, ids: list[str]) -> int:
    return sum(http.get(f"/v1/get_result?id={i}").json()["status"] == "Ready" for i in ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flood", type=int, default=100)
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fluxserve-fair-"))
    try:
        data = tmp / "data"
        exe = str(Path(sys.executable).with_name("fluxserve"))
        key_b = subprocess.run(
            [exe, "keys", "create", "--name", "b", "--data-dir", str(data)], capture_output=True, text=True, check=True
        ).stdout.strip()
        port = free_port()
        server = start_server(data, port)
        base = f"http://127.0.0.1:{port}"
        a = httpx.Client(base_url=base, headers={"x-key": KEY}, timeout=60)
        b = httpx.Client(base_url=base, headers={"x-key": key_b}, timeout=60)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            flood = list(pool.map(lambda _: a.post("/v1/flux-dev", json=BODY).json()["id"], range(args.flood)))
        flood_s = time.perf_counter() - t0
        probes = []
        for _ in range(args.probes):
            t = time.perf_counter()
            job = b.post("/v1/flux-dev", json=BODY).json()["id"]
            told = (b.get(f"/v1/get_result?id={job}").json().get("details") or {}).get("queue_position")
            while b.get(f"/v1/get_result?id={job}").json()["status"] != "Ready":
                time.sleep(0.05)
            probes.append({"wait_s": round(time.perf_counter() - t, 3), "told": told, "flood_done": _done(a, flood)})
        stop_server(server)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "machine": f"{os.cpu_count()} CPU cores, demo model",
        "flood": args.flood,
        "flood_create_s": round(flood_s, 2),
        "first_probe_wait_s": probes[0]["wait_s"],
        # Probes that ran while some of the flood was still queued (later ones may find it drained).
        "probe_wait_median_s": round(
            statistics.median(p["wait_s"] for p in probes if p["flood_done"] < args.flood)
            if any(p["flood_done"] < args.flood for p in probes)
            else probes[0]["wait_s"],
            3,
        ),
        "probes": probes,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
