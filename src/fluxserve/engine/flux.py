"""DiffusersEngine: real diffusers FLUX pipelines, loaded once, called by one worker thread."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from PIL.Image import Image

from ..errors import GenerationFailed
from ..models import ModelRegistry, ModelSpec
from ..spec import GenerationSpec
from .base import Cancelled, OnStep

log = logging.getLogger(__name__)


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_pipeline(weights: str, *, device: str, local_files_only: bool) -> Any:
    """The one loading path for real weights and the demo model alike."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    # bf16 is FLUX's native precision on accelerators; CPUs are slow and inexact in bf16.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    pipe = FluxPipeline.from_pretrained(weights, dtype=dtype, local_files_only=local_files_only)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class DiffusersEngine:
    def __init__(self, registry: ModelRegistry, *, device: str = "auto", local_files_only: bool = False) -> None:
        self._registry = registry
        self._device_request = device
        self._local_files_only = local_files_only
        self._pipes: dict[str, Any] = {}
        self.device = "unloaded"
        # Work that must happen before weights load, off the request path (building the demo model).
        self.before_load: Callable[[], object] | None = None

    def load(self) -> None:
        if self.before_load is not None:
            self.before_load()
        self.device = pick_device(self._device_request)
        by_weights: dict[str, Any] = {}
        for model in self._registry:
            # Names that share weights (flux-dev / flux-pro) share one loaded pipeline.
            if model.weights not in by_weights:
                log.info("loading %s for %s on %s", model.weights, model.name, self.device)
                try:
                    by_weights[model.weights] = load_pipeline(
                        model.weights, device=self.device, local_files_only=self._local_files_only
                    )
                except Exception as exc:
                    offline = (
                        " (offline: only local folders and the hub cache are used)" if self._local_files_only else ""
                    )
                    raise RuntimeError(
                        f"could not load weights {model.weights!r} for model {model.name!r}{offline}: {exc}"
                    ) from exc
            self._pipes[model.name] = by_weights[model.weights]

    def loaded_models(self) -> list[str]:
        return list(self._pipes)

    def generate(self, specs: Sequence[GenerationSpec], on_step: OnStep) -> list[list[Image]]:
        import torch

        if not specs or len({s.batch_key() for s in specs}) != 1:
            raise ValueError("generate() takes a non-empty batch of specs with the same batch_key()")
        first = specs[0]
        model: ModelSpec = self._registry.get(first.model)
        pipe = self._pipes[first.model]
        prompts = [s.prompt for s in specs for _ in range(s.num_images)]
        # CPU generators make a seed mean the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(seed) for s in specs for seed in s.image_seeds()]

        def callback(pipeline: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            try:
                on_step(step + 1, first.steps)
            except Cancelled:
                pipeline._interrupt = True
                raise
            return tensors

        kwargs: dict[str, Any] = {}
        if first.guidance is not None:
            kwargs["guidance_scale"] = first.guidance
        try:
            with torch.inference_mode():
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
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise GenerationFailed(
                f"Out of device memory at {first.width}x{first.height} x{len(prompts)}; try a smaller size or n."
            ) from exc
        images: list[Image] = list(result.images)
        out: list[list[Image]] = []
        for s in specs:
            out.append(images[: s.num_images])
            images = images[s.num_images :]
        return out
