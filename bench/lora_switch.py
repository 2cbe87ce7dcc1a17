"""The cost of switching LoRA adapters between consecutive requests vs keeping one.

    python bench/lora_switch.py [--reps 8] [--size 256] [--steps 4] [--compile]

On the demo model's FLUX.2 [klein] folder with two demo adapters built offline. Three ways to run
the same requests, alternating so drift hits all alike:
  plain diffusers: both adapters loaded once, then set_adapters + pipe(...) per request;
  fluxserve's engine (4 slots): both resident, the switch is set_adapters only;
  fluxserve's engine (1 slot): every switch unloads one adapter and loads the other.
Each runs "keep" (A, A, A, ...) and "switch" (A, B, A, B, ...). With --compile both sides'
transformer blocks are compiled (the engine with LoRA hot-swap slots, plain diffusers with
set_adapters as its docs show) and the requests that recompiled are counted.
Never part of the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=8, help="requests per phase")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch
    from diffusers import Flux2KleinPipeline
    from torch._dynamo.utils import counters

    from fluxserve.engine.base import EngineRequest
    from fluxserve.engine.demo import build_demo_lora, build_demo_model
    from fluxserve.engine.flux import DiffusersEngine
    from fluxserve.engine.speed import SpeedOptions
    from fluxserve.loras import LoraLibrary, LoraRequest
    from fluxserve.models import ModelRegistry
    from fluxserve.models.demo import demo_weights

    tmp = Path(tempfile.mkdtemp(prefix="fluxserve-lora-bench-"))
    try:
        demo = build_demo_model(tmp / "demo")
        a_path = build_demo_lora(demo, "flux2", tmp / "loras" / "a.safetensors", seed=1)
        b_path = build_demo_lora(demo, "flux2", tmp / "loras" / "b.safetensors", seed=2)
        registry = ModelRegistry.demo(demo).only(["flux-2-klein-4b"])
        model = registry.get("flux-2-klein-4b")
        library = LoraLibrary(
            tmp / "loras", tmp / "cache", cache_bytes=10**9, max_bytes=10**8, offline=True, allow_private=False
        )
        [a] = asyncio.run(library.resolve([LoraRequest("a", 1.0, "lora")], model))
        [b] = asyncio.run(library.resolve([LoraRequest("b", 1.0, "lora")], model))
        # Under --compile the engine takes adapters through hot-swap slots (rank 8 covers both demo adapters).
        speed = SpeedOptions(
            compile=args.compile, warmup_sizes=((args.size, args.size),), lora_hotswap_rank=8 if args.compile else 0
        )
        engines = {}
        for slots in (4, 1):
            engine = DiffusersEngine(registry, device="cpu", local_files_only=True, speed=speed, lora_slots=slots)
            engine.load()
            engines[slots] = engine
        plain = Flux2KleinPipeline.from_pretrained(
            demo_weights(demo, "flux2"), dtype=torch.float32, local_files_only=True
        )
        plain.set_progress_bar_config(disable=True)
        plain.load_lora_weights(str(a_path), adapter_name="a")
        plain.load_lora_weights(str(b_path), adapter_name="b")
        if args.compile:  # plain diffusers' way: compile, then set_adapters per request
            plain.transformer.compile_repeated_blocks(fullgraph=True)

        def spec_for(adapter: Any) -> Any:
            return model.make_spec(
                prompt="a lighthouse", width=args.size, height=args.size, steps=args.steps, seed=1, loras=(adapter,)
            )

        def run_plain(adapter: Any) -> None:
            plain.set_adapters([adapter.source], adapter_weights=[adapter.scale])
            plain(
                prompt=["a lighthouse"],
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                guidance_scale=1.0,
                generator=[torch.Generator().manual_seed(1)],
            )

        def runner(name: str) -> Any:
            if name == "plain":
                return run_plain
            engine = engines[4 if name == "fluxserve_4_slots" else 1]
            return lambda adapter: engine.generate([EngineRequest(spec_for(adapter))], lambda d, t, p: None)

        sides = ("plain", "fluxserve_4_slots", "fluxserve_1_slot")
        for side in sides:  # warm-up: both adapters through every side once
            runner(side)(a), runner(side)(b)
        times: dict[str, dict[str, list[float]]] = {s: {"keep": [], "switch": []} for s in sides}
        recompiles: dict[str, dict[str, int]] = {s: {"keep": 0, "switch": 0} for s in sides}
        for i in range(args.reps):
            for phase in ("keep", "switch"):
                adapter = b if phase == "switch" and i % 2 else a
                for side in sides:
                    before = sum(counters["stats"].values()) if args.compile else 0
                    t = time.perf_counter()
                    runner(side)(adapter)
                    times[side][phase].append(time.perf_counter() - t)
                    if args.compile:
                        recompiles[side][phase] += int(sum(counters["stats"].values()) != before)
        loads = {
            "fluxserve_4_slots": engines[4].adapter_slots(engines[4]._pipes[model.name]).loads,
            "fluxserve_1_slot": engines[1].adapter_slots(engines[1]._pipes[model.name]).loads,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {s: {p: statistics.median(v) for p, v in ph.items()} for s, ph in times.items()}
    result = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, device cpu",
        "request": f"flux-2-klein-4b demo, {args.size}x{args.size}, {args.steps} steps, one adapter per request",
        "compile": args.compile,
        "reps": args.reps,
        "median_s": {s: {p: round(v, 4) for p, v in ph.items()} for s, ph in med.items()},
        "switch_over_keep": {s: round(med[s]["switch"] / med[s]["keep"], 3) for s in sides},
        "fluxserve_over_plain": {
            p: round(med["fluxserve_4_slots"][p] / med["plain"][p], 3) for p in ("keep", "switch")
        },
        "adapter_file_loads_after_warmup_and_run": loads,
        "requests_that_recompiled": recompiles if args.compile else None,
    }
    print(json.dumps(result, indent=2))
    ratios = ", ".join(f"{side} {ratio}" for side, ratio in result["switch_over_keep"].items())
    print(f"\nswitch / keep: {ratios}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
