"""Throughput on CPU with the demo model: 8 concurrent clients, batching on and off, vs sequential plain diffusers.

    python bench/cpu_throughput.py [--clients 8] [--requests 16] [--sizes 256 1024]

Each size: plain diffusers runs the same prompts one after another (pipe(...) + PNG encode);
fluxserve runs over HTTP on two servers (--max-batch 1 and --max-batch 8), the clients sending
/v1/images/generations concurrently. The three set-ups alternate over --rounds rounds; prints
median images/s and the ratio to plain diffusers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from _common import KEY, free_port, start_server, stop_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16, help="total requests per run")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the three set-ups")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch
    from diffusers import FluxPipeline

    from fluxserve.engine.demo import build_demo_model
    from fluxserve.models.demo import demo_weights

    tmp = Path(tempfile.mkdtemp(prefix="fluxserve-bench-"))
    results: dict[str, object] = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "runs": []}
    try:
        demo = build_demo_model(tmp / "data" / "demo-model")
        pipe = FluxPipeline.from_pretrained(demo_weights(demo, "text2img"), dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        for size in args.sizes:
            n = args.requests if size <= 512 else max(args.clients, args.requests // 2)

            def plain_one(i: int, size: int = size) -> None:
                gen = torch.Generator().manual_seed(i)
                with torch.inference_mode():
                    out = pipe(
                        f"prompt number {i}",
                        height=size,
                        width=size,
                        num_inference_steps=args.steps,
                        generator=gen,
                        max_sequence_length=256,
                    )
                out.images[0].save(io.BytesIO(), format="PNG")

            servers = {mb: free_port() for mb in (1, 8)}
            procs = [start_server(tmp / f"data-{mb}", port, "--max-batch", str(mb)) for mb, port in servers.items()]
            clients = {
                mb: httpx.Client(
                    base_url=f"http://127.0.0.1:{port}",
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=600,
                    limits=httpx.Limits(max_connections=args.clients),
                )
                for mb, port in servers.items()
            }

            def served_one(i: int, http: httpx.Client, size: int = size) -> None:
                body = {
                    "model": "flux-schnell",
                    "prompt": f"prompt number {i}",
                    "size": f"{size}x{size}",
                    "steps": args.steps,
                    "seed": i,
                    "response_format": "b64_json",
                }
                http.post("/v1/images/generations", json=body).raise_for_status()

            def plain_all(n: int = n) -> None:
                for i in range(n):
                    plain_one(i)

            def served_all(http: httpx.Client, n: int = n) -> None:
                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(lambda i: served_one(i, http), range(n)))

            runs: dict[str, Callable[[], None]] = {"plain": plain_all}
            runs |= {f"max_batch_{mb}": (lambda http=http: served_all(http)) for mb, http in clients.items()}
            plain_one(0)  # warm-up: first calls pay one-off allocations on every side
            for http in clients.values():
                served_one(0, http)
            # Rounds alternate the three set-ups, so a machine that speeds up or slows down mid-run
            # (shared CPUs do) moves all three alike; medians over the rounds.
            rates: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run_all in runs.items():
                    t = time.perf_counter()
                    run_all()
                    rates[name].append(n / (time.perf_counter() - t))
            for proc in procs:
                stop_server(proc)
            plain_ips = statistics.median(rates["plain"])
            run: dict[str, object] = {
                "size": size,
                "requests": n,
                "rounds": args.rounds,
                "plain_sequential_images_per_s": round(plain_ips, 3),
            }
            for mb in clients:
                ips = statistics.median(rates[f"max_batch_{mb}"])
                run[f"fluxserve_max_batch_{mb}_images_per_s"] = round(ips, 3)
                run[f"ratio_max_batch_{mb}"] = round(ips / plain_ips, 3)
            results["runs"].append(run)  # type: ignore[attr-defined]
            print(json.dumps(run), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
