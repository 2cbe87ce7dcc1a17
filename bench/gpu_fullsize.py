"""Full-size FLUX architecture with random weights on one GPU: plain diffusers vs fluxserve's modes.

    python bench/gpu_fullsize.py --variant schnell     # 4 steps
    python bench/gpu_fullsize.py --variant dev         # 28 steps
    python bench/gpu_fullsize.py --tiny                # CPU smoke run (tiny config, timings meaningless)

No download: FluxTransformer2DModel is built from FLUX.1's published config, with CLIP-L- and
T5-XXL-sized encoders and FLUX's VAE, directly on the device in bf16. Random weights give the
real compute cost (images are noise). Modes: plain diffusers eager, fluxserve default,
--cache first-block, --compile, --compile --quantize fp8. Reports per-step and end-to-end
time at 1024x1024, achieved TFLOP/s (74.4 TFLOP per transformer step at 1024x1024), peak
memory; writes a JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

TFLOP_PER_STEP_1024 = 74.4
FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": (16, 56, 56),
}
TINY_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 4, 8),
}


def build_pipeline(tiny: bool, guidance: bool, device: str, dtype: Any) -> Any:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxserve.engine.demo import build_demo_model
    from fluxserve.models.demo import demo_weights

    # Tokenizers come from the demo model (built offline); the encoders get real FLUX sizes.
    demo = FluxPipeline.from_pretrained(
        demo_weights(build_demo_model(Path.home() / ".cache" / "fluxserve-bench-demo"), "text2img"),
        local_files_only=True,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(
                **(TINY_TRANSFORMER if tiny else FLUX_TRANSFORMER), guidance_embeds=guidance
            )
            if tiny:
                clip, t5, vae = demo.text_encoder, demo.text_encoder_2, demo.vae
            else:
                vocab = len(demo.tokenizer)
                clip = CLIPTextModel(
                    CLIPTextConfig(
                        hidden_size=768,
                        intermediate_size=3072,
                        num_attention_heads=12,
                        num_hidden_layers=12,
                        vocab_size=vocab,
                        projection_dim=768,
                    )
                )
                t5 = T5EncoderModel(
                    T5Config(
                        d_model=4096,
                        d_ff=10240,
                        d_kv=64,
                        num_heads=64,
                        num_layers=24,
                        vocab_size=len(demo.tokenizer_2),
                        feed_forward_proj="gated-gelu",
                    )
                )
                vae = AutoencoderKL(
                    in_channels=3,
                    out_channels=3,
                    latent_channels=16,
                    down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4,
                    block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2,
                    use_quant_conv=False,
                    use_post_quant_conv=False,
                    shift_factor=0.1159,
                    scaling_factor=0.3611,
                )
    finally:
        torch.set_default_dtype(previous)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
        vae=vae,
        text_encoder=clip,
        tokenizer=demo.tokenizer,
        text_encoder_2=t5,
        tokenizer_2=demo.tokenizer_2,
        transformer=transformer,
    )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed_run(call: Any, steps: int, sync: Any) -> tuple[float, float, float, float]:
    """(end to end, median step, before the first step ends, after the last) in seconds for one call."""
    marks: list[float] = []

    def callback(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        sync()
        marks.append(time.perf_counter())
        return tensors

    sync()
    start = time.perf_counter()
    call(callback)
    sync()
    end = time.perf_counter()
    gaps = [b - a for a, b in zip([start, *marks[:-1]], marks, strict=True)][1:] or [end - start]
    step = statistics.median(gaps)
    return end - start, step, (marks[0] - start) if marks else 0.0, (end - marks[-1]) if marks else 0.0


SPEED_MODES = {
    "cache": {"first_block_cache": 0.08},
    "compile": {"compile": True},
    "compile+cache": {"compile": True, "first_block_cache": 0.08},
    "compile+fp8": {"compile": True, "quantize": "fp8"},
}


def measure(mode: str, pipe: Any, registry: Any, spec: Any, device: str, args: Any, sync: Any) -> dict[str, Any]:
    """One mode's row; everything it builds dies with this frame, the pipeline aside."""
    import torch

    from fluxserve.engine.base import EngineRequest
    from fluxserve.engine.flux import DiffusersEngine
    from fluxserve.engine.speed import SpeedOptions, apply

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine = DiffusersEngine(registry, device=device)
    engine.use_pipeline(spec.model, pipe)
    if mode in SPEED_MODES:
        apply(pipe, SpeedOptions(**SPEED_MODES[mode]), device)  # type: ignore[arg-type]

    def plain_call(cb: Any) -> None:
        with torch.inference_mode():
            pipe(
                spec.prompt,
                height=spec.height,
                width=spec.width,
                num_inference_steps=spec.steps,
                generator=torch.Generator("cpu").manual_seed(1),
                callback_on_step_end=cb,
                max_sequence_length=256 if args.variant == "schnell" else 512,
            )

    def served_call(cb: Any) -> None:
        engine.generate([EngineRequest(spec)], lambda d, t, p: cb(None, d - 1, None, {}))

    call = plain_call if mode == "plain" else served_call
    warm_t = time.perf_counter()
    call(lambda *a: a[-1])  # warm-up; compiles in the compile modes
    warmup_s = time.perf_counter() - warm_t
    runs = [timed_run(call, spec.steps, sync) for _ in range(args.reps)]
    step = statistics.median(r[1] for r in runs)
    if "cache" in mode:
        pipe.transformer.disable_cache()
    return {
        "mode": mode,
        "end_to_end_s": round(statistics.median(r[0] for r in runs), 4),
        "step_s": round(step, 5),
        "warmup_s": round(warmup_s, 2),
        # Text encoders + first step, and VAE decode + conversion to PIL: where end to end goes beyond steps.
        "until_first_step_s": round(statistics.median(r[2] for r in runs), 4),
        "after_last_step_s": round(statistics.median(r[3] for r in runs), 4),
        "tflops": round(TFLOP_PER_STEP_1024 * (spec.width / 1024) ** 4 / step, 1) if not args.tiny else None,
        "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["schnell", "dev"], default="schnell")
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU: a smoke run, timings meaningless")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument(
        "--modes", nargs="+", default=["plain", "default", "cache", "compile", "compile+cache", "compile+fp8"]
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    import torch

    from fluxserve.engine.speed import check_fp8
    from fluxserve.models import ModelRegistry

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    size = args.size or (256 if args.tiny else 1024)
    steps = 4 if args.variant == "schnell" else 28
    model_name = "flux-schnell" if args.variant == "schnell" else "flux-dev"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    registry = ModelRegistry([m for m in ModelRegistry.default() if m.name == model_name])
    spec = registry.get(model_name).make_spec(
        prompt="a photo of a lighthouse at dusk", width=size, height=size, steps=steps, seed=1
    )
    rows: list[dict[str, Any]] = []
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'CPU'} (tiny smoke run)"
    report = {"machine": machine, "torch": torch.__version__, "variant": args.variant, "size": size, "steps": steps}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_fullsize_{args.variant}{'_tiny' if args.tiny else ''}"
    built = time.perf_counter()
    pipe = build_pipeline(args.tiny, guidance=args.variant == "dev", device=device, dtype=dtype)
    print(f"pipeline built in {time.perf_counter() - built:.1f} s", flush=True)
    touched = False  # whether a speed mode has changed the pipeline (fp8 then needs a fresh one)

    for mode in args.modes:
        if mode == "compile+fp8":
            try:
                check_fp8(device)
            except RuntimeError as exc:
                rows.append({"mode": mode, "skipped": str(exc)})
                continue
            if touched:
                # A fresh bf16 pipeline to quantize: drop the compiled one and its graphs first, or both
                # copies (2 x 34 GB) would sit in VRAM.
                del pipe
                gc.collect()
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                pipe = build_pipeline(args.tiny, guidance=args.variant == "dev", device=device, dtype=dtype)
        touched = touched or mode in SPEED_MODES
        rows.append(measure(mode, pipe, registry, spec, device, args, sync))
        print(json.dumps(rows[-1]), flush=True)
        # Written after every mode: a run cut short by a time limit keeps what it measured.
        (args.out / f"{stem}.json").write_text(json.dumps({**report, "rows": rows}, indent=2))

    (args.out / f"{stem}.json").write_text(json.dumps({**report, "rows": rows}, indent=2))
    plain = next((r for r in rows if r["mode"] == "plain" and "end_to_end_s" in r), None)
    lines = [
        f"{machine}, torch {torch.__version__}, FLUX.1-{args.variant} architecture, {size}x{size}, {steps} steps",
        "",
        "| mode | end to end (s) | per step (s) | TFLOP/s | peak VRAM (GiB) | vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['mode']} | skipped: {r['skipped']} | | | | |")
            continue
        ratio = f"{r['end_to_end_s'] / plain['end_to_end_s']:.2f}x" if plain else ""
        lines.append(
            f"| {r['mode']} | {r['end_to_end_s']} | {r['step_s']} | {r['tflops']} | {r['peak_vram_gib']} | {ratio} |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
