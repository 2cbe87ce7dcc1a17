"""fluxserve over HTTP vs a plain diffusers call, same request, same machine, same run.

    python bench/http_vs_diffusers.py [--reps 7] [--size 1024] [--steps 4]

Plain side: FluxPipeline loaded from the demo model folder, pipe(...) + PNG encode.
fluxserve side: `fluxserve serve --demo` as a subprocess, POST /v1/images/generations
with response_format=b64_json (the client ends up holding the same PNG bytes).
Runs alternate so drift hits both sides alike; prints medians and their ratio.
Never part of the test suite's pass/fail.
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
from pathlib import Path

import httpx

from _common import KEY, free_port, start_server, stop_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import torch
    from diffusers import FluxPipeline

    from fluxserve.engine.demo import build_demo_model, demo_weights

    tmp = Path(tempfile.mkdtemp(prefix="fluxserve-bench-"))
    try:
        demo = build_demo_model(tmp / "data" / "demo-model")
        pipe = FluxPipeline.from_pretrained(demo_weights(demo, "text2img"), dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        port = free_port()
        server = start_server(tmp / "data", port)
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}, timeout=300
        )
        body = {
            "model": "flux-schnell",
            "prompt": "a white siamese cat",
            "size": f"{args.size}x{args.size}",
            "steps": args.steps,
            "seed": 1,
            "response_format": "b64_json",
        }

        def plain() -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                img = pipe(
                    "a white siamese cat",
                    height=args.size,
                    width=args.size,
                    num_inference_steps=args.steps,
                    generator=torch.Generator().manual_seed(1),
                    max_sequence_length=256,
                ).images[0]
            img.save(io.BytesIO(), format="PNG")
            return time.perf_counter() - t

        def served() -> float:
            t = time.perf_counter()
            resp = http.post("/v1/images/generations", json=body)
            resp.raise_for_status()
            return time.perf_counter() - t

        plain(), served()  # warm-up: first calls pay one-off allocations on both sides
        plain_s, served_s = [], []
        for _ in range(args.reps):
            plain_s.append(plain())
            served_s.append(served())
        stop_server(server)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, device cpu",
        "request": f"{args.size}x{args.size}, {args.steps} steps, demo model, n=1, png",
        "reps": args.reps,
        "plain_diffusers_median_s": round(statistics.median(plain_s), 4),
        "fluxserve_http_median_s": round(statistics.median(served_s), 4),
        "ratio": round(statistics.median(served_s) / statistics.median(plain_s), 3),
        # Each rep runs the two back to back: the median of their ratios is robust to a machine
        # whose speed drifts during the run (shared CPUs).
        "paired_ratio": round(statistics.median(f / p for f, p in zip(served_s, plain_s, strict=True)), 3),
        "plain_s": [round(x, 4) for x in plain_s],
        "fluxserve_s": [round(x, 4) for x in served_s],
    }
    print(json.dumps(result, indent=2))
    print(f"\nfluxserve / plain diffusers: {result['ratio']:.3f} (medians), {result['paired_ratio']:.3f} (paired)")
    print("goal <= 1.05")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
