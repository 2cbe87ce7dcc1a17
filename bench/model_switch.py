"""Serving three model names from a memory budget that holds two: throughput and loads under mixed traffic.

    python bench/model_switch.py [--jobs 30] [--size 256] [--steps 2] [--device cpu] [--json PATH]

On the demo model (FLUX.1 schnell, FLUX.1 Fill, FLUX.2 klein: the two FLUX.1 pipelines share their encoders
and VAE), the same seeded mixed sequence of jobs runs three ways, in one process:
  resident: every pipeline loaded at start (today's --preload all), the ceiling;
  fluxserve: lazy, a budget that holds two of the three, least recently used to the host tier;
  reload every time: plain diffusers, from_pretrained + .to(device) for each job (what a server without a
    memory ledger does when it cannot keep everything), the floor.
Then the re-warm of one pipeline: from the host tier vs from disk. On CPU the tier keeps the modules where
they are, so that ratio shows the disk read saved, not a device copy; on a GPU it is a host-to-device copy.
Never part of the test suite's pass/fail; JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

NAMES = ("flux-schnell", "flux-fill", "flux-2-klein-4b")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "model_switch.json")
    args = ap.parse_args()

    from PIL import Image

    from fluxserve.engine.base import EngineRequest
    from fluxserve.engine.demo import build_demo_model
    from fluxserve.engine.flux import DiffusersEngine
    from fluxserve.engine.inventory import inventory
    from fluxserve.engine.loading import load_pipeline
    from fluxserve.models import ModelRegistry

    tmp = Path(tempfile.mkdtemp(prefix="fluxserve-switch-bench-"))
    try:
        demo = build_demo_model(tmp / "demo")
        registry = ModelRegistry.demo(demo).only(list(NAMES))
        item = 4 if args.device == "cpu" else 2
        sizes = {n: sum(p.nbytes for p in inventory(str(registry.get(n).weights), item) or []) for n in NAMES}
        budget = sorted(sizes.values())[-1] + sorted(sizes.values())[-2] + 20_000  # two of three, never all
        rng = random.Random(7)
        sequence = [rng.choice(NAMES) for _ in range(args.jobs)]
        gray, mask = Image.new("RGB", (args.size, args.size), "gray"), Image.new("L", (args.size, args.size), 255)

        def request(name: str) -> EngineRequest:
            model = registry.get(name)
            fill = model.traits.takes_mask
            spec = model.make_spec(
                prompt="a lighthouse",
                width=args.size,
                height=args.size,
                steps=args.steps,
                seed=1,
                images=("in/0.png",) if fill else (),
                mask="in/mask.png" if fill else None,
            )
            return EngineRequest(spec, images=[gray] if fill else [], mask=mask if fill else None)

        def served(engine: DiffusersEngine) -> dict[str, Any]:
            started = time.perf_counter()
            loads: list[str] = []
            engine.on_load = lambda name, seconds: loads.append(name)
            for name in sequence:
                engine.generate([request(name)], lambda d, t, p: None)
            elapsed = time.perf_counter() - started
            rate = round(len(sequence) / elapsed, 3)
            return {"seconds": round(elapsed, 3), "images_per_s": rate, "loads": len(loads)}

        resident = DiffusersEngine(registry, device=args.device, local_files_only=True)
        resident.load()
        for name in NAMES:  # first calls pay one-off costs (kernels, allocator): not the resident ceiling's
            resident.generate([request(name)], lambda d, t, p: None)
        results: dict[str, Any] = {"resident": served(resident), "sizes_bytes": sizes, "budget_bytes": budget}
        results["resident"]["used_bytes"] = resident.memory()["used_bytes"]
        del resident

        lazy = DiffusersEngine(registry, device=args.device, local_files_only=True, preload=[], memory_budget=budget)
        lazy.load()
        results["fluxserve"] = served(lazy)
        results["fluxserve"]["evictions"] = len(lazy.pool.evictions)
        results["fluxserve"]["max_used_bytes_at_end"] = lazy.memory()["used_bytes"]

        started = time.perf_counter()
        for name in sequence:  # plain diffusers, nothing kept
            model = registry.get(name)
            pipe = load_pipeline(model.weights, model.kind, device=args.device, local_files_only=True)
            r = request(name)
            kwargs: dict[str, Any] = {"image": r.images[0], "mask_image": r.mask} if r.mask is not None else {}
            pipe(prompt=["a lighthouse"], height=args.size, width=args.size, num_inference_steps=args.steps, **kwargs)
            del pipe
        elapsed = time.perf_counter() - started
        results["reload_every_time"] = {
            "seconds": round(elapsed, 3),
            "images_per_s": round(len(sequence) / elapsed, 3),
            "loads": len(sequence),
        }

        one = max(sizes["flux-schnell"], sizes["flux-2-klein-4b"]) + 20_000  # either, never both
        results["rewarm"] = _rewarm(registry, args.device, one, request)
        for way in ("fluxserve", "reload_every_time"):
            results[way]["vs_resident"] = round(results[way]["images_per_s"] / results["resident"]["images_per_s"], 3)
        results["fluxserve_vs_reload"] = round(
            results["fluxserve"]["images_per_s"] / results["reload_every_time"]["images_per_s"], 2
        )
        results["config"] = {"jobs": args.jobs, "size": args.size, "steps": args.steps, "device": args.device}
        print(json.dumps(results, indent=2))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rewarm(registry: Any, device: str, one: int, request: Any) -> dict[str, Any]:
    """Bring schnell back after klein pushed it out: from the host tier, then with no tier (from disk)."""
    from fluxserve.engine.flux import DiffusersEngine

    out: dict[str, Any] = {}
    for label, tier in (("from_host_tier_s", None), ("from_disk_s", 0)):
        engine = DiffusersEngine(
            registry, device=device, local_files_only=True, preload=[], memory_budget=one, cpu_memory_budget=tier
        )
        engine.load()
        times: list[float] = []

        def timed(name: str, seconds: float, times: list[float] = times) -> None:
            if name == "flux-schnell":
                times.append(seconds)

        engine.on_load = timed
        for _ in range(3):
            engine.generate([request("flux-schnell")], lambda d, t, p: None)
            engine.generate([request("flux-2-klein-4b")], lambda d, t, p: None)
        out[label] = round(sorted(times[1:])[len(times[1:]) // 2], 4)  # the re-warms, not the first load
    out["ratio"] = round(out["from_disk_s"] / max(out["from_host_tier_s"], 1e-6), 1)
    return out


if __name__ == "__main__":
    main()
