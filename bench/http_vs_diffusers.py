"""fluxserve over HTTP vs a plain diffusers call, same request, same machine, same run.

    python bench/http_vs_diffusers.py [--reps 7] [--size 1024] [--steps 4]
    python bench/http_vs_diffusers.py --model flux-2-klein-4b --refs 3 --size 512

Plain side: the model's diffusers pipeline (FluxPipeline, or Flux2KleinPipeline for a FLUX.2
name) loaded from the demo model folder, pipe(...) + PNG encode.
fluxserve side: `fluxserve serve --demo --models MODEL` as a subprocess, POST
/v1/images/generations (or /v1/images/edits with --refs reference images) with
response_format=b64_json (the client ends up holding the same PNG bytes).
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
    ap.add_argument("--model", default="flux-schnell", choices=["flux-schnell", "flux-2-klein-4b"])
    ap.add_argument("--refs", type=int, default=0, help="reference images (an edit; FLUX.2 only)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import diffusers
    import torch
    from PIL import Image

    from fluxserve.engine.demo import build_demo_model
    from fluxserve.models.demo import demo_weights

    flux2 = args.model.startswith("flux-2")
    if args.refs and not flux2:
        raise SystemExit("--refs needs a FLUX.2 model")
    refs = [Image.new("RGB", (384, 256), (40 * i, 120, 200 - 40 * i)) for i in range(args.refs)]
    tmp = Path(tempfile.mkdtemp(prefix="fluxserve-bench-"))
    server = None
    try:
        demo = build_demo_model(tmp / "data" / "demo-model")
        cls = diffusers.Flux2KleinPipeline if flux2 else diffusers.FluxPipeline
        folder = demo_weights(demo, "flux2" if flux2 else "text2img")
        pipe = cls.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        # The same call fluxserve makes: klein is distilled (guidance 1), FLUX.2 encodes 512 tokens.
        extra = {"guidance_scale": 1.0, "max_sequence_length": 512} if flux2 else {"max_sequence_length": 256}
        if refs:
            extra["image"] = refs
        port = free_port()
        server = start_server(tmp / "data", port, "--models", args.model)
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}, timeout=300
        )
        body = {
            "model": args.model,
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
                    prompt="a white siamese cat",
                    height=args.size,
                    width=args.size,
                    num_inference_steps=args.steps,
                    generator=torch.Generator().manual_seed(1),
                    **extra,
                ).images[0]
            img.save(io.BytesIO(), format="PNG")
            return time.perf_counter() - t

        ref_files = []
        for i, ref in enumerate(refs):
            buf = io.BytesIO()
            ref.save(buf, format="PNG")
            ref_files.append(("image[]", (f"{i}.png", buf.getvalue(), "image/png")))

        def served() -> float:
            t = time.perf_counter()
            if ref_files:
                form = {k: str(v) for k, v in body.items()}
                resp = http.post("/v1/images/edits", data=form, files=ref_files)
            else:
                resp = http.post("/v1/images/generations", json=body)
            resp.raise_for_status()
            return time.perf_counter() - t

        plain(), served()  # warm-up: first calls pay one-off allocations on both sides
        plain_s, served_s = [], []
        for _ in range(args.reps):
            plain_s.append(plain())
            served_s.append(served())
    finally:
        if server is not None:  # also when a request failed: no server left running
            stop_server(server)
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, device cpu",
        "request": f"{args.model}, {args.size}x{args.size}, {args.steps} steps, {args.refs} references, demo model, "
        "n=1, png",
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
