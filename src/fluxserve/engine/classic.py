"""The call of diffusers' classic FLUX pipelines (FLUX.1, FLUX.2): prompts, seeds, the task's inputs, the step
callback with previews and cancellation, LoRA slots around it. FLUX 3's modular pipelines run their own
(families.flux3.generate)."""

from __future__ import annotations

from typing import Any

from PIL.Image import Image

from ..images import compose_references
from ..models import ModelSpec
from .base import Cancelled, EngineRequest, OnStep
from .common import decode_preview, out_of_memory_is_a_failure, takes
from .lora import AdapterSlots, HotswapSlots


def run_classic(
    pipe: Any,
    model: ModelSpec,
    requests: list[EngineRequest],
    on_step: OnStep,
    adapters: AdapterSlots | HotswapSlots | None,
) -> list[list[Image]]:
    """One pipeline call for the batch; each request's images in order."""
    import torch

    first = requests[0].spec
    prompts = [r.spec.prompt for r in requests for _ in range(r.spec.num_images)]
    # CPU generators make a seed mean the same noise on every device.
    generators = [torch.Generator("cpu").manual_seed(s) for r in requests for s in r.spec.image_seeds()]

    preview_steps = first.preview_steps()

    def callback(pipeline: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        done = step + 1
        previews = None
        if done in preview_steps:
            previews = decode_preview(pipeline, tensors["latents"], first.height, first.width)
        try:
            on_step(done, first.steps, previews)
        except Cancelled:
            pipeline._interrupt = True
            raise
        return tensors

    kwargs: dict[str, Any] = {}
    if takes(pipe, "guidance_scale"):  # klein KV takes no guidance at all
        if first.guidance is not None:
            kwargs["guidance_scale"] = first.guidance
        elif model.traits.guidance_when_none is not None:
            kwargs["guidance_scale"] = model.traits.guidance_when_none
    inputs = requests[0]
    if first.task == "img2img":
        kwargs.update(image=inputs.images[0], strength=first.strength)
    elif first.task == "kontext":
        if inputs.images:
            kwargs["image"] = compose_references(inputs.images)
        kwargs["max_area"] = first.width * first.height  # keeps the requested size exactly
    elif first.task == "references":
        # Each reference in its own position slot; the pipeline scales any above 1 MP down itself.
        kwargs["image"] = list(inputs.images)
    elif first.task == "fill":
        kwargs.update(image=inputs.images[0], mask_image=inputs.mask)
    try:
        if adapters is not None:
            adapters.activate(pipe, first.loras)
        with out_of_memory_is_a_failure(first.width, first.height, len(prompts)), torch.inference_mode():
            result = pipe(
                prompt=prompts,
                height=first.height,
                width=first.width,
                num_inference_steps=first.steps,
                generator=generators,
                max_sequence_length=model.max_sequence_length,
                callback_on_step_end=callback,
                output_type="pil",
                **kwargs,
            )
    finally:
        if adapters is not None:
            adapters.deactivate(pipe)
    images: list[Image] = list(result.images)
    out: list[list[Image]] = []
    for r in requests:
        out.append(images[: r.spec.num_images])
        images = images[r.spec.num_images :]
    return out
