"""ModelSpec: one public model name: its weights, pipeline kind, defaults, limits and routes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import InvalidInput
from ..spec import (
    MAX_PIXELS,
    MAX_SEED,
    MAX_SIDE,
    MIN_SIDE,
    SIDE_MULTIPLE,
    Adapter,
    GenerationSpec,
    OutputFormat,
    Task,
    check_prompt,
    check_size,
)
from .families import KINDS, Kind

# A [models] table's kind: see families.KINDS.
PipelineKind = Literal["text2img", "kontext", "fill", "flux2", "flux3"]
DEFAULT_STRENGTH = 0.8  # Replicate flux-dev's prompt_strength default


@dataclass(frozen=True)
class ModelSpec:
    name: str
    weights: str
    kind: PipelineKind = "text2img"
    default_steps: int = 28
    max_steps: int = 50
    default_guidance: float | None = 3.5  # None: the model takes no guidance (schnell, distilled klein)
    min_guidance: float = 0.0
    max_guidance: float = 10.0
    max_images: int | None = None  # reference images per request; None: what the kind allows
    max_sequence_length: int = 512
    min_side: int = MIN_SIDE
    max_side: int = MAX_SIDE
    side_multiple: int = SIDE_MULTIPLE
    max_pixels: int = MAX_PIXELS
    license: str = ""
    pipeline: str = ""  # a diffusers class for kind flux2; empty: the one model_index.json names
    # FLUX 3: the prompt upsampler's weights (flux-3-image-klein-pup); empty: none, prompt_upsampling is refused.
    upsampler: str = ""
    description: str = ""
    demo: bool = False
    # Upstream providers ([upstreams.NAME], fluxserve.upstream): served only there, or local first and
    # sent there when no local worker started the job within spill_after_s; fallback: where a failing
    # upstream's jobs go next.
    upstream: str = ""
    upstream_model: str = ""  # the upstream's own name for it; empty: this name
    spill_to: str = ""
    spill_after_s: float = 30.0
    fallback: tuple[str, ...] = ()
    price: float | None = None  # credits per image (or per megapixel with price_per_mp)
    price_per_mp: float | None = None

    @property
    def is_local(self) -> bool:
        """Run by this deployment's devices (possibly spilling upstream), not only by a provider."""
        return not self.upstream

    def served_by(self) -> dict[str, Any]:
        """/v1/models: where jobs of this name run."""
        if self.upstream:
            return {"where": "upstream", "upstream": self.upstream, "fallback": list(self.fallback)}
        if self.spill_to:
            return {"where": "local", "spill_to": self.spill_to, "spill_after_s": self.spill_after_s}
        return {"where": "local"}

    def cost(self, spec: GenerationSpec) -> float | None:
        """The credits a job of this spec costs (None: no price set)."""
        if self.price_per_mp is not None:
            return round(self.price_per_mp * spec.num_images * spec.width * spec.height / 1e6, 6)
        return None if self.price is None else round(self.price * spec.num_images, 6)

    @property
    def label(self) -> str:
        return f"{self.name} (demo model: random weights, output is noise)" if self.demo else self.name

    @property
    def traits(self) -> Kind:
        """What this kind of weights takes (families.KINDS)."""
        return KINDS[self.kind]

    @property
    def takes_references(self) -> bool:
        """Input images are references to edit from (not an init image to redraw)."""
        return self.traits.takes_references

    @property
    def image_limit(self) -> int:
        return self.traits.max_images if self.max_images is None else self.max_images

    def facts(self) -> dict[str, Any]:
        """What a client may send this model: /v1/models and the playground show it."""
        guidance = None
        if self.default_guidance is not None:
            guidance = {"default": self.default_guidance, "min": self.min_guidance, "max": self.max_guidance}
        inputs = list(self.traits.inputs)
        return {
            "kind": self.kind,
            "steps": {"default": self.default_steps, "min": 1, "max": self.max_steps},
            "guidance": guidance,
            "max_images": self.image_limit,
            "inputs": inputs,
            "size": {
                "min_side": self.min_side,
                "max_side": self.max_side,
                "multiple": self.side_multiple,
                "max_pixels": self.max_pixels,
            },
            "license": self.license or None,
            "served_by": self.served_by(),
            "price": self.price,
        }

    def check_image_count(self, count: int, *, param: str) -> None:
        if count > self.image_limit:
            raise InvalidInput(
                f"{self.name} takes at most {self.image_limit} input image(s); got {count}.",
                param=param,
                code="too_many_images",
            )

    def check_reference(self, size: tuple[int, int], *, param: str) -> None:
        """FLUX.2's image processor refuses tiny and very long references: say so before anything runs."""
        w, h = size
        least, longest = self.traits.min_reference_side, self.traits.max_reference_aspect
        if least and (min(w, h) < least or max(w, h) > longest * min(w, h)):
            raise InvalidInput(
                f"{param} is {w}x{h}; {self.name} needs reference images at least {least} px "
                f"a side and no longer than {longest:g}:1.",
                param=param,
            )

    def make_spec(
        self,
        *,
        prompt: str,
        width: int,
        height: int,
        num_images: int = 1,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        output_format: OutputFormat = "png",
        quality: int = 100,
        images: tuple[str, ...] = (),
        mask: str | None = None,
        strength: float | None = None,
        params: dict[str, str] | None = None,
        allow_empty_prompt: bool = False,
        loras: tuple[Adapter, ...] = (),
        upsample: bool = False,
        safety_tolerance: int = 2,
    ) -> GenerationSpec:
        """Validate a request against this model's limits. ``params`` maps our names to the dialect's."""
        names = {
            "prompt": "prompt",
            "size": "size",
            "steps": "steps",
            "guidance": "guidance",
            "seed": "seed",
            "image": "image",
            "mask": "mask",
            "strength": "strength",
            "upsample": "prompt_upsampling",
        }
        names.update(params or {})
        names.setdefault("height", names["size"])
        if not (allow_empty_prompt and prompt == ""):
            check_prompt(prompt, param=names["prompt"])
        task = self._task(images, mask, names)
        if strength is not None and not 0 <= strength <= 1:
            raise InvalidInput(f"{names['strength']} must be between 0 and 1; got {strength}.", param=names["strength"])
        if task == "img2img" and strength is None:
            strength = DEFAULT_STRENGTH
        check_size(
            width,
            height,
            param=names["size"],
            height_param=names["height"],
            min_side=self.min_side,
            max_side=self.max_side,
            multiple=self.side_multiple,
            max_pixels=self.max_pixels,
        )
        steps = self.default_steps if steps is None else steps
        if not 1 <= steps <= self.max_steps:
            raise InvalidInput(
                f"{names['steps']} must be between 1 and {self.max_steps} for {self.name}; got {steps}.",
                param=names["steps"],
            )
        # A model without guidance ignores it (clients send it to every model); one with it checks it.
        in_range = guidance is None or self.min_guidance <= guidance <= self.max_guidance
        if self.default_guidance is not None and not in_range:
            raise InvalidInput(
                f"{names['guidance']} must be between {self.min_guidance:g} and {self.max_guidance:g} "
                f"for {self.name}; got {guidance:g}.",
                param=names["guidance"],
            )
        # FLUX.1 and FLUX.2 accept the flag as before (a no-op); FLUX 3 honours it, or says it can't.
        upsample = upsample and self.traits.upsampler
        if upsample and not self.upsampler:
            raise InvalidInput(
                f'{self.name}: no prompt upsampler is configured here (upsampler = "..." in its [models] table); '
                f"send {names['upsample']}: false, or a prompt written out in full.",
                param=names["upsample"],
            )
        if loras and not self.traits.lora:
            raise InvalidInput(
                f"{self.name} takes no LoRA adapters here (diffusers has no LoRA loader for its family).",
                param="loras",
            )
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise InvalidInput(f"{names['seed']} must be between 0 and {MAX_SEED}; got {seed}.", param=names["seed"])
        return GenerationSpec(
            model=self.name,
            prompt=prompt,
            width=width,
            height=height,
            num_images=num_images,
            steps=steps,
            guidance=(guidance if guidance is not None else self.default_guidance)
            if self.default_guidance is not None
            else None,
            seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed,
            output_format=output_format,
            quality=quality,
            task=task,
            images=images,
            mask=mask,
            strength=strength if task == "img2img" else None,
            loras=loras,
            upsample=upsample,
            safety_tolerance=safety_tolerance,
        )

    def _task(self, images: tuple[str, ...], mask: str | None, names: dict[str, str]) -> Task:
        traits = self.traits
        if traits.takes_mask:
            if len(images) != 1 or mask is None:
                raise InvalidInput(f"{self.name} needs one image and a mask.", param=names["mask"])
            return traits.image_task
        if mask is not None:
            raise InvalidInput(f"{self.name} does not take a mask; use flux-fill.", param=names["mask"])
        if len(images) > 1 and not traits.takes_references:
            raise InvalidInput(f"{self.name} takes one input image; got {len(images)}.", param=names["image"])
        self.check_image_count(len(images), param=names["image"])
        return traits.image_task if images else traits.task_without_images
