"""Loading a pipeline: the device, the diffusers class, the one loading path for real weights and the demo
model alike, and the requests that warm a compiled pipeline up."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from ..models import ModelSpec
from .base import EngineRequest
from .families import for_kind
from .lora import HotswapSlots
from .speed import SpeedOptions, apply, place

log = logging.getLogger(__name__)


def pipeline_class_name(weights: str, kind: str, *, local_files_only: bool, pipeline: str = "") -> str:
    """The diffusers class for the weights, checked before any weights are read."""
    return for_kind(kind).pipeline_class(weights, kind, pipeline, local_files_only)


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_pipeline(
    weights: str,
    kind: str,
    *,
    device: str,
    local_files_only: bool,
    speed: SpeedOptions | None = None,
    pipeline: str = "",
    lora_slots: int = 4,
    upsampler: str = "",
    reuse: dict[str, Any] | None = None,
) -> Any:
    """The one loading path for real weights and the demo model alike. ``reuse``: components already loaded
    (the same weights, by content: engine.inventory) that the pipeline takes instead of reading its own."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    # bf16 is FLUX's native precision on accelerators; CPUs are slow and inexact in bf16.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    name = pipeline_class_name(weights, kind, local_files_only=local_files_only, pipeline=pipeline)
    family = for_kind(kind)
    pipe = family.load(
        weights, name, dtype=dtype, upsampler=upsampler, local_files_only=local_files_only, reuse=reuse or {}
    )
    speed = speed or SpeedOptions()
    pipe.fluxserve_offload = place(pipe, speed, device)
    upsampling = getattr(pipe, "fluxserve_upsampling", None)  # FLUX 3's: shares pipe's modules but the upsampler
    if upsampling is not None and pipe.fluxserve_offload == "none":
        upsampling.prompt_upsampler.to(device)
    if speed.compile and speed.lora_hotswap_rank:
        # Before compiling: the slots' LoRA layers are part of the graph from the first call.
        # Kept on the transformer: img2img's pipeline (from_pipe) shares it, and so its slots.
        pipe.transformer.fluxserve_hotswap = HotswapSlots(pipe, rank=speed.lora_hotswap_rank, cached=lora_slots)
    apply(pipe, speed, device, placement=pipe.fluxserve_offload)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def warmup_requests(model: ModelSpec, sizes: tuple[tuple[int, int], ...]) -> Iterator[EngineRequest]:
    """A compiled pipeline's first calls, one per configured size and reference count: compiling happens now,
    so no user request pays for it."""
    from PIL import Image as PILImage

    gray = PILImage.new("RGB", (64, 64), (128, 128, 128))
    # Kontext with a reference image runs twice the tokens of one without: warm the shape edits use.
    # FLUX.2 serves text-to-image and edits alike: both shapes (one reference; more compile on first use).
    for (width, height), count in ((size, n) for size in sizes for n in model.traits.warmup_references):
        images = [gray.resize((width, height))] * count
        mask = PILImage.new("L", (width, height), 255) if model.traits.takes_mask else None
        keys = tuple(f"warmup/{i}.png" for i in range(len(images)))
        spec = model.make_spec(
            prompt="warm-up",
            width=width,
            height=height,
            steps=2,
            seed=0,
            images=keys,
            mask="warmup/mask.png" if mask else None,
        )
        log.info("warming up %s at %dx%d with %d reference(s)", model.name, width, height, count)
        yield EngineRequest(spec, images=images, mask=mask)
