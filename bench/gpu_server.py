"""fluxserve's HTTP server on a GPU vs plain diffusers, full-size FLUX.1-schnell geometry, random weights.

    python bench/gpu_server.py [--reps 20] [--clients 8] [--per-client 3]
    python bench/gpu_server.py --tiny --reps 2 --per-client 1     # CPU smoke run, timings meaningless

No download and no weights on disk: the pipeline that bench/gpu_fullsize.py builds in memory is
served by the real app (create_app + uvicorn on loopback, the real worker, store and encoder)
through ``DiffusersEngine.use_pipeline``. In the same process run:

1. sequential: ``--reps`` requests of 1024x1024, 4 steps, b64_json over HTTP, alternating with the
   plain pipeline call + PNG encode; the ratio of medians is the server's overhead (goal <= 1.03);
2. concurrent: ``--clients`` clients at 512x512 sending ``--per-client`` requests each, once with
   batching off (--max-batch 1) and once on (--max-batch 8, batch pixel cap 512x512); images/s
   against plain diffusers one image at a time and eight per call.

Writes bench/results/gpu_server.json. Never part of the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from _common import KEY, free_port
from gpu_fullsize import build_pipeline

PROMPT = "a photo of a lighthouse at dusk"


class ServedPipeline:
    """The real app on loopback, its one worker serving an in-memory pipeline as flux-schnell."""

    def __init__(self, pipe: Any, device: str, data_dir: Path, **settings: Any) -> None:
        import uvicorn

        from fluxserve.app import create_app
        from fluxserve.engine.flux import DiffusersEngine
        from fluxserve.models import ModelRegistry
        from fluxserve.settings import Settings

        registry = ModelRegistry([m for m in ModelRegistry.default() if m.name == "flux-schnell"])
        engine = DiffusersEngine(registry, device=device)
        engine.use_pipeline("flux-schnell", pipe)
        engine.load = lambda: None  # type: ignore[method-assign]  # already built in memory
        port = free_port()
        app = create_app(Settings(data_dir=data_dir, api_key=KEY, **settings), engine=engine)
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).json().get("status") == "ready":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise SystemExit("fluxserve did not become ready")

    def generate(self, http: httpx.Client, size: int) -> float:
        body = {
            "model": "flux-schnell",
            "prompt": PROMPT,
            "size": f"{size}x{size}",
            "steps": 4,
            "seed": 1,
            "response_format": "b64_json",
        }
        t = time.perf_counter()
        resp = http.post("/v1/images/generations", json=body)
        if resp.status_code != 200:
            raise SystemExit(f"fluxserve answered {resp.status_code}: {resp.text}")
        elapsed = time.perf_counter() - t
        base64.b64decode(resp.json()["data"][0]["b64_json"], validate=True)
        return elapsed

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(60)


def plain_call(pipe: Any, size: int, n: int, sync: Any) -> float:
    import torch

    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        images = pipe(
            [PROMPT] * n,
            height=size,
            width=size,
            num_inference_steps=4,
            generator=[torch.Generator("cpu").manual_seed(1 + i) for i in range(n)],
            max_sequence_length=256,
        ).images
    for img in images:
        img.save(io.BytesIO(), format="PNG", compress_level=1)
    return time.perf_counter() - t


def concurrent(served: ServedPipeline, clients: int, per_client: int, size: int) -> dict[str, Any]:
    def client(_i: int) -> list[float]:
        with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as http:
            return [served.generate(http, size) for _ in range(per_client)]

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for xs in pool.map(client, range(clients)) for x in xs]
    wall = time.perf_counter() - t
    return {
        "images": len(latencies),
        "wall_s": round(wall, 3),
        "images_per_s": round(len(latencies) / wall, 3),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_max_s": round(max(latencies), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="sequential phase size (1024; 256 with --tiny)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    import torch

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    size = args.size or (256 if args.tiny else 1024)
    small = 256 if args.tiny else 512
    pipe = build_pipeline(args.tiny, guidance=False, device=device, dtype=dtype)
    report: dict[str, Any] = {
        "machine": torch.cuda.get_device_name() if device == "cuda" else "CPU (tiny smoke run)",
        "torch": torch.__version__,
        "architecture": "FLUX.1-schnell (random weights), 4 steps",
    }
    with tempfile.TemporaryDirectory(prefix="fluxserve-gpu-server-") as tmp:
        served = ServedPipeline(pipe, device, Path(tmp) / "seq", max_batch=1)
        http = httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)
        plain_call(pipe, size, 1, sync), served.generate(http, size)  # warm-up on both sides
        plain_s, served_s = [], []
        for _ in range(args.reps):
            plain_s.append(plain_call(pipe, size, 1, sync))
            served_s.append(served.generate(http, size))
        served.stop()
        report["sequential"] = {
            "size": size,
            "reps": args.reps,
            "plain_median_s": round(statistics.median(plain_s), 4),
            "fluxserve_http_median_s": round(statistics.median(served_s), 4),
            "ratio": round(statistics.median(served_s) / statistics.median(plain_s), 4),
            "paired_ratio": round(statistics.median(f / p for f, p in zip(served_s, plain_s, strict=True)), 4),
        }
        print(json.dumps(report["sequential"]), flush=True)

        total = args.clients * args.per_client
        one = [plain_call(pipe, small, 1, sync) for _ in range(min(total, 8))]
        eight = [plain_call(pipe, small, args.clients, sync) for _ in range(2)]
        report["concurrent"] = {
            "size": small,
            "clients": args.clients,
            "per_client": args.per_client,
            "plain_one_at_a_time_images_per_s": round(1 / statistics.median(one), 3),
            f"plain_batch_of_{args.clients}_images_per_s": round(args.clients / statistics.median(eight), 3),
        }
        for label, settings in (
            ("batching_off", {"max_batch": 1}),
            ("batching_on", {"max_batch": 8, "batch_max_pixels": small * small}),
        ):
            served = ServedPipeline(pipe, device, Path(tmp) / label, **settings)
            report["concurrent"][label] = concurrent(served, args.clients, args.per_client, small)
            served.stop()
            print(label, json.dumps(report["concurrent"][label]), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_server_tiny.json" if args.tiny else "gpu_server.json"
    (args.out / name).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
