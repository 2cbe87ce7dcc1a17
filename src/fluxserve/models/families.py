"""What each pipeline kind is, as data: the one table the registry, the engine, the demo and the workers
read instead of branching on kind strings.

A ``kind`` is what a ``[models.NAME]`` table names; a family (FLUX.1, FLUX.2, FLUX 3) groups the kinds whose
weights share components and loading code. The engine's half of a family (pipelines, previews, the demo
builder) lives in ``engine/families/``; this half is what a request to such weights may carry, readable
without torch, by API nodes too.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from ..spec import Task

FamilyName = Literal["flux1", "flux2", "flux3"]


@dataclass(frozen=True)
class Component:
    """A pipeline component by its diffusers name; ``shared`` when other weights of the family load the
    same one (text encoders, VAE), so one copy in memory can serve them all."""

    name: str
    role: str
    shared: bool = False


@dataclass(frozen=True)
class Kind:
    name: str
    family: FamilyName
    # What input images make of a request: img2img redraws one; kontext and references edit from several;
    # fill paints a masked region.
    image_task: Task
    max_images: int
    inputs: tuple[str, ...]
    components: tuple[Component, ...]
    pipeline: str = ""  # the diffusers class; empty: the one model_index.json names (FLUX.2)
    task_without_images: Task = "text2img"
    lora: bool = True
    upsampler: bool = False  # a prompt upsampler may be configured (prompt_upsampling)
    one_prompt_per_batch: bool = False  # its pipeline call takes one prompt: never batch two jobs
    guidance_when_none: float | None = None  # what its pipeline is told when the model takes no guidance
    warmup_references: tuple[int, ...] = (0,)  # reference counts whose shapes --compile warms up
    min_reference_side: int = 0
    max_reference_aspect: float = 0.0
    needs_torchvision: bool = False  # its processors import torchvision, whatever the weights
    demo_folder: str = ""

    @property
    def takes_references(self) -> bool:
        """Input images are references to edit from (not an init image to redraw)."""
        return self.image_task in ("kontext", "references")

    @property
    def takes_mask(self) -> bool:
        return self.image_task == "fill"

    def shared_components(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components if c.shared)


_VAE = Component("vae", "autoencoder", shared=True)
_FLUX1 = (
    Component("transformer", "denoiser"),
    Component("text_encoder", "CLIP-L", shared=True),
    Component("text_encoder_2", "T5-XXL", shared=True),
    _VAE,
)
_FLUX2 = (Component("transformer", "denoiser"), Component("text_encoder", "Qwen3 or Mistral 3", shared=True), _VAE)
_FLUX3 = (Component("transformer", "denoiser"), Component("text_encoder", "Qwen3-VL", shared=True), _VAE)
FLUX2_MIN_REFERENCE_SIDE = 64  # FLUX.2's image processor refuses references smaller than this
FLUX2_MAX_REFERENCE_ASPECT = 8  # ... or longer than 8:1

KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "text2img",
            "flux1",
            image_task="img2img",
            max_images=1,
            inputs=("prompt", "image"),
            components=_FLUX1,
            pipeline="FluxPipeline",
            demo_folder="flux",
        ),
        # FLUX.1 Kontext sees several references as one side-by-side canvas; past 16 the canvas is mush.
        Kind(
            "kontext",
            "flux1",
            image_task="kontext",
            task_without_images="kontext",
            max_images=16,
            inputs=("prompt", "images"),
            components=_FLUX1,
            pipeline="FluxKontextPipeline",
            warmup_references=(1,),
            demo_folder="kontext",
        ),
        Kind(
            "fill",
            "flux1",
            image_task="fill",
            max_images=1,
            inputs=("prompt", "image", "mask"),
            components=_FLUX1,
            pipeline="FluxFillPipeline",
            warmup_references=(1,),
            demo_folder="fill",
        ),
        # Any FLUX.2 pipeline (dev, klein, klein KV), references passed natively.
        Kind(
            "flux2",
            "flux2",
            image_task="references",
            max_images=4,
            inputs=("prompt", "images"),
            components=(
                Component("transformer", "denoiser"),
                Component("text_encoder", "Qwen3 / Mistral 3", True),
                _VAE,
            ),
            guidance_when_none=1.0,  # distilled klein: diffusers' default 4.0 only logs a warning
            warmup_references=(0, 1),
            min_reference_side=FLUX2_MIN_REFERENCE_SIDE,
            max_reference_aspect=FLUX2_MAX_REFERENCE_ASPECT,
            demo_folder="flux2",
        ),
        # FLUX 3 Image Klein through diffusers' modular pipelines (distilled or base): up to 10 references
        # (diffusers' flux3 MAX_REFERENCES); Qwen3-VL's processor needs torchvision; no LoRA loader yet.
        Kind(
            "flux3",
            "flux3",
            image_task="references",
            max_images=10,
            inputs=("prompt", "images"),
            components=_FLUX3,
            lora=False,
            upsampler=True,
            one_prompt_per_batch=True,
            warmup_references=(0, 1),
            needs_torchvision=True,
            demo_folder="flux3",
        ),
    )
}


def has_torchvision() -> bool:
    """Installed, without importing it (nor torch): API nodes decide the demo's names too."""
    return importlib.util.find_spec("torchvision") is not None


def kind(name: str) -> Kind:
    return KINDS[name]
