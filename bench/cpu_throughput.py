"""Throughput on CPU with the demo model: 8 concurrent clients, batching on and off, vs sequential plain diffusers.

    python bench/cpu_throughput.py [--clients 8] [--requests 16] [--sizes 256 1024]

Each size: plain diffusers runs the same prompts one after another (pipe(...) + PNG encode);
fluxserve runs twice over HTTP (--max-batch 1 and --max-batch 8), the clients sending
/v1/images/generations concurrently. Prints images/s and the ratio to plain diffusers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
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
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch
    from diffusers import FluxPipeline

    from fluxserve.engine.demo import build_demo_model, demo_weights

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

            plain_one(0)  # warm-up
            t = time.perf_counter()
            for i in range(n):
                plain_one(i)
            plain_ips = n / (time.perf_counter() - t)
            run: dict[str, object] = {"size": size, "requests": n, "plain_sequential_images_per_s": round(plain_ips, 3)}
            for max_batch in (1, 8):
                port = free_port()
                server = start_server(tmp / "data", port, "--max-batch", str(max_batch))
                http = httpx.Client(
                    base_url=f"http://127.0.0.1:{port}",
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=600,
                    limits=httpx.Limits(max_connections=args.clients),
                )

                def served_one(i: int, size: int = size, http: httpx.Client = http) -> None:
                    body = {
                        "model": "flux-schnell",
                        "prompt": f"prompt number {i}",
                        "size": f"{size}x{size}",
                        "steps": args.steps,
                        "seed": i,
                        "response_format": "b64_json",
                    }
                    http.post("/v1/images/generations", json=body).raise_for_status()

                served_one(0)
                t = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(served_one, range(n)))
                ips = n / (time.perf_counter() - t)
                stop_server(server)
                run[f"fluxserve_max_batch_{max_batch}_images_per_s"] = round(ips, 3)
                run[f"ratio_max_batch_{max_batch}"] = round(ips / plain_ips, 3)
            results["runs"].append(run)  # type: ignore[attr-defined]
            print(json.dumps(run), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
