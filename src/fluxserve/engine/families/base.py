"""The engine's half of a model family: how its weights load, how a call runs, how its demo is built.

The data half (what a request may carry, components and which are shared) is ``models.families``; the
engine reads both through ``families.for_kind``, and nothing else in the engine branches on a kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL.Image import Image

from ...models import ModelSpec
from ..base import EngineRequest, OnStep

# (pipe, model, requests, on_step) -> each request's images: a family whose pipelines are not diffusers'
# classic ones (FLUX 3's modular pipelines) runs its own call.
Generate = Callable[[Any, ModelSpec, list[EngineRequest], OnStep], list[list[Image]]]


def load_classic(
    weights: str, class_name: str, *, dtype: Any, upsampler: str, local_files_only: bool, reuse: dict[str, Any]
) -> Any:
    """A diffusers pipeline class by name, from its folder or hub id; ``reuse`` holds components already loaded
    (the same weights, by content): from_pretrained takes them as they are and reads only the others."""
    import diffusers

    cls = getattr(diffusers, class_name)
    return cls.from_pretrained(weights, dtype=dtype, local_files_only=local_files_only, **reuse)


@dataclass(frozen=True)
class EngineFamily:
    name: str
    # (weights, kind, pipeline, local_files_only) -> the diffusers class to load, checked before any weights.
    pipeline_class: Callable[[str, str, str, bool], str]
    # (with_torchvision) -> {demo folder: object with save_pretrained}: the family's tiny demo weights.
    demo: Callable[[bool], dict[str, Any]]
    load: Callable[..., Any] = load_classic
    generate: Generate | None = None  # None: the engine's diffusers call (callback_on_step_end, interrupt)
    task_pipelines: dict[str, str] = field(default_factory=dict)  # a task run by another class over the same modules
    lora_targets: tuple[str, ...] = ()  # the demo LoRA's target modules (diffusers' own tests pick these)
