"""Opt-in speed and memory modes for the FLUX transformer. The default changes no pixel.

- attention: diffusers' attention dispatcher; ``auto`` takes the fastest installed kernel
  (FlashAttention 3, then 2, then SageAttention) on CUDA and PyTorch SDPA elsewhere. Exact
  kernels only, except sage (8-bit QK), which auto never picks.
- compile: ``torch.compile`` of the transformer's repeated blocks (regional: seconds, not
  minutes), with a persistent inductor cache; warmed up at start. It also fuses each attention's
  Q, K and V projections into one matmul (same maths; pixels may differ by float rounding, as
  compiled kernels do).
- quantize fp8: torchao float8 weights and activations with per-row scales (lossy; needs compute
  capability 8.9+).
- first-block cache: skips the remaining blocks when the first block's residual barely
  changes between steps (lossy; ~1.5-2x fewer block evaluations at threshold 0.08).
- offload: model / group offload for GPUs that can't hold the pipeline; ``auto`` decides
  from free device memory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Offload = Literal["none", "model", "group", "auto"]
_EXACT_BACKENDS = ("_flash_3", "flash")  # tried in this order by auto


@dataclass(frozen=True)
class SpeedOptions:
    compile: bool = False
    quantize: Literal["none", "fp8"] = "none"
    attention: str = "auto"
    first_block_cache: float | None = None
    offload: Offload = "auto"
    vae_tiling: bool = False
    compile_cache_dir: Path | None = None
    warmup_sizes: tuple[tuple[int, int], ...] = ((1024, 1024),)
    # Under compile: LoRA hot-swap slots of this rank, prepared before compiling (0: no adapters).
    lora_hotswap_rank: int = 0

    @property
    def lossy(self) -> list[str]:
        """The enabled modes that change images (shown in /health and logs)."""
        modes = []
        if self.quantize != "none":
            modes.append(f"quantize={self.quantize}")
        if self.first_block_cache is not None:
            modes.append(f"first-block-cache={self.first_block_cache}")
        if "sage" in self.attention:
            modes.append(f"attention={self.attention}")
        return modes


def resolve_attention(name: str, device: str) -> str:
    from diffusers.models import attention_dispatch as ad

    if name != "auto":
        return name
    if not device.startswith("cuda"):
        return "native"
    available = {"_flash_3": ad.is_flash_attn_3_available(), "flash": ad.is_flash_attn_available()}
    return next((b for b in _EXACT_BACKENDS if available[b]), "native")


def check_fp8(device: str) -> None:
    import torch

    if not device.startswith("cuda") or torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError("--quantize fp8 needs a CUDA GPU with compute capability 8.9 or newer (Ada, Hopper).")
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("--quantize fp8 needs torchao: pip install 'fluxserve[fast]'") from exc


def place(pipe: Any, opts: SpeedOptions, device: str) -> str:
    """Move the pipeline to the device, or offload it; returns the mode used."""
    mode = opts.offload
    if mode == "auto":
        mode = _auto_offload(pipe, device)
    if mode == "none" or device == "cpu":
        pipe.to(device)
        mode = "none"
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        from diffusers.hooks import apply_group_offloading

        for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
            module = getattr(pipe, name, None)
            if module is not None:
                apply_group_offloading(module, onload_device=device, offload_type="leaf_level", use_stream=True)
    if opts.vae_tiling or mode != "none":
        pipe.vae.enable_tiling()
    log.info("pipeline placement on %s: offload=%s", device, mode)
    return mode


def _auto_offload(pipe: Any, device: str) -> Offload:
    import torch

    if not device.startswith("cuda"):
        return "none"
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    need = sum(
        p.numel() * p.element_size()
        for name in ("transformer", "text_encoder", "text_encoder_2", "vae")
        if getattr(pipe, name, None) is not None
        for p in getattr(pipe, name).parameters()
    )
    transformer = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    headroom = 6 * 1024**3  # activations and the VAE decode at 1-2 MP
    if need + headroom <= free:
        return "none"
    if transformer + headroom <= free:
        return "model"
    return "group"


# diffusers 0.42's First-Block-Cache hook subtracts a list from a tensor on FLUX.2's blocks.
_NO_FIRST_BLOCK_CACHE = ("Flux2Transformer2DModel",)
_UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def fuse_qkv(transformer: Any) -> None:
    """One (3d x d) matmul per attention instead of three, without keeping the separate copies.

    diffusers' fusion keeps the unfused layers for ``unfuse``; on FLUX that is 2.1 B parameters
    (4.3 GB in bf16) nothing reads once fused, so they are dropped.
    """
    transformer.fuse_qkv_projections()
    for module in transformer.modules():
        if getattr(module, "fused_projections", False):
            for name in _UNFUSED:
                if name in module._modules:
                    delattr(module, name)


def apply(pipe: Any, opts: SpeedOptions, device: str, placement: str = "none") -> None:
    """Speed modes, in the order that composes: attention, fused projections, fp8, cache, compile."""
    if opts.quantize == "fp8":
        check_fp8(device)
    transformer = pipe.transformer
    backend = resolve_attention(opts.attention, device)
    if backend != "native":
        transformer.set_attention_backend(backend)
    log.info("attention backend: %s", backend)
    # Offload hooks are attached to the existing layers; fused layers would be new ones without them.
    # LoRA layers wrap to_q/to_k/to_v: fusing them would drop the adapters (hot-swap slots need them).
    if (opts.compile or opts.quantize != "none") and placement == "none" and not opts.lora_hotswap_rank:
        # Fused before fp8 so the fused weight is what is quantized.
        # The VAE stays as it is: channels-last and fused VAE attention made the 1024x1024 decode
        # slower on an H100 (0.18 s after the last step vs 0.11 s eager; bench/gpu_fullsize.py).
        fuse_qkv(transformer)
    if opts.quantize == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        # Per-row scales: finer than one scale per tensor, and the layout H100's fp8 kernels favour.
        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    if opts.first_block_cache is not None and type(transformer).__name__ in _NO_FIRST_BLOCK_CACHE:
        log.warning(
            "First-Block-Cache is not applied to %s: diffusers' hook fails on its blocks (0.42)",
            type(transformer).__name__,
        )
    elif opts.first_block_cache is not None:
        from diffusers import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=opts.first_block_cache))
    if opts.compile:
        if opts.compile_cache_dir is not None:
            # Inductor reads these when it first compiles: restarts reuse the kernels.
            # Assigned, not defaulted: inductor writes its own default here once anything has compiled.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(opts.compile_cache_dir)
            os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
            os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
        # First-Block-Cache decides per step in Python whether to run the other blocks: that is a graph
        # break inside the hooked blocks, so whole-graph capture is only asked for without it.
        transformer.compile_repeated_blocks(fullgraph=opts.first_block_cache is None)
