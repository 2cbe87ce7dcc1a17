"""BFL's request schemas, each turning itself into a GenerationSpec (``to_spec``).

Field names and wire formats are BFL's; steps, guidance and size limits are the model's
(ModelSpec.make_spec), so an operator's TOML defaults reach this dialect too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..errors import InvalidInput
from ..models import ModelSpec
from ..models.families import KINDS
from ..spec import FLUX3_RESOLUTIONS as RESOLUTIONS
from ..spec import GenerationSpec, ratio_size
from .deps import Services
from .inputs import Inputs, image_and_size


class _Common(BaseModel):
    # BFL accepts and ignores fields it does not know (LiteLLM sends width/height to Kontext); a known
    # field of the wrong type is still a 422.
    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str
    seed: int | None = None
    prompt_upsampling: bool = False  # FLUX 3: its upsampler rewrites the prompt; elsewhere accepted, a no-op
    safety_tolerance: int = Field(default=2, ge=0, le=6)  # the output safety check (engine/safety.py), if any
    output_format: Literal["jpeg", "png", "webp"] | None = "jpeg"
    webhook_url: str | None = Field(default=None, min_length=1, max_length=2083)
    webhook_secret: str | None = Field(default=None, max_length=1024)

    async def _sized_inputs(self, services: Services, owner: str, model: ModelSpec) -> tuple[Inputs, int, int]:
        raise NotImplementedError

    def _steps_guidance(self) -> tuple[int | None, float | None]:
        return None, None

    def unapplied(self) -> list[str]:
        """Known fields this request's others override: the job's input names them as ignored."""
        return []

    def hosted(self) -> dict[str, Any]:
        """Fields only the hosted provider serving the name reads (GenerationSpec.hosted)."""
        return {}

    async def to_spec(self, services: Services, owner: str, model: ModelSpec) -> tuple[GenerationSpec, Inputs]:
        """The spec and the decoded input images (stored only once the job is admitted)."""
        inputs, width, height = await self._sized_inputs(services, owner, model)
        steps, guidance = self._steps_guidance()
        spec = model.make_spec(
            prompt=self.prompt,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            seed=self.seed,
            output_format=self.output_format or "jpeg",
            quality=95,
            images=inputs.keys,
            params={"size": "width", "height": "height"},
            upsample=self.prompt_upsampling,
            safety_tolerance=self.safety_tolerance,
        )
        return (replace(spec, hosted=self.hosted()) if not model.is_local else spec), inputs


class Pro11Inputs(_Common):
    width: int = 1024
    height: int = 768
    image_prompt: str | None = None

    async def _sized_inputs(self, services: Services, owner: str, model: ModelSpec) -> tuple[Inputs, int, int]:
        if self.image_prompt:
            raise InvalidInput("image_prompt (Redux) is not supported by this server.", param="image_prompt")
        inputs, _, _ = await image_and_size(services, owner, model, [], aspect_ratio="1:1", aspect_explicit=True)
        return inputs, self.width, self.height


class DevInputs(Pro11Inputs):
    steps: int | None = None
    guidance: float | None = None

    def _steps_guidance(self) -> tuple[int | None, float | None]:
        return self.steps, self.guidance


class ProInputs(DevInputs):
    interval: float = Field(default=2, ge=1, le=4)


class KontextInputs(_Common):
    input_image: str | None = None
    input_image_2: str | None = None
    input_image_3: str | None = None
    input_image_4: str | None = None
    aspect_ratio: str | None = None
    # Not in BFL's Kontext schema, but clients send them: applied without an aspect_ratio; beside one (LiteLLM
    # sends both) the aspect ratio wins and the job's input names them as ignored.
    width: int | None = None
    height: int | None = None
    output_format: Literal["jpeg", "png", "webp"] | None = "png"

    async def _sized_inputs(self, services: Services, owner: str, model: ModelSpec) -> tuple[Inputs, int, int]:
        names = ("input_image", "input_image_2", "input_image_3", "input_image_4")
        values = [(n, v) for n, v in zip(names, self._images(), strict=True) if v]
        if not self.aspect_ratio and (self.width is not None or self.height is not None):
            if self.width is None or self.height is None:
                param = "height" if self.width is not None else "width"
                raise InvalidInput(f"width and height go together; {param} is missing.", param=param)
            inputs, _, _ = await image_and_size(
                services, owner, model, values, aspect_ratio="1:1", aspect_explicit=True
            )
            return inputs, self.width, self.height
        if self.aspect_ratio:
            width, height = ratio_size(self.aspect_ratio)
            inputs, _, _ = await image_and_size(
                services, owner, model, values, aspect_ratio="1:1", aspect_explicit=True
            )
            return inputs, width, height
        aspect = "match_input_image" if values else "1:1"
        return await image_and_size(services, owner, model, values, aspect_ratio=aspect, aspect_explicit=False)

    def _images(self) -> tuple[str | None, ...]:
        return self.input_image, self.input_image_2, self.input_image_3, self.input_image_4

    def unapplied(self) -> list[str]:
        return [n for n in ("height", "width") if self.aspect_ratio and getattr(self, n) is not None]


class _Flux2Base(_Common):
    # 0 or absent: the first reference's aspect ratio at about 1 MP, or 1024x1024 without one.
    width: int | None = None
    height: int | None = None

    async def _sized_inputs(self, services: Services, owner: str, model: ModelSpec) -> tuple[Inputs, int, int]:
        count = sum(1 for name in type(self).model_fields if name.startswith("input_image"))
        named = [(image_field(i), getattr(self, image_field(i))) for i in range(1, count + 1)]
        values = [(n, v) for n, v in named if v]
        aspect = "match_input_image" if values else "1:1"
        inputs, width, height = await image_and_size(
            services, owner, model, values, aspect_ratio=aspect, aspect_explicit=False
        )
        if self.width or self.height:
            if not (self.width and self.height):
                missing = "height" if self.width else "width"
                raise InvalidInput(f"Send width and height together; {missing} is missing.", param=missing)
            width, height = self.width, self.height
        return inputs, width, height


def _flux2_schema(name: str, references: int, base: type[_Flux2Base] = _Flux2Base) -> type[_Flux2Base]:
    """input_image, input_image_2 ... input_image_N, as BFL documents each FLUX.2 endpoint."""
    fields: dict[str, Any] = {image_field(i): (str | None, None) for i in range(1, references + 1)}
    return create_model(name, __base__=base, **fields)


def image_field(i: int) -> str:
    return "input_image" if i == 1 else f"input_image_{i}"


class _FlexBase(_Flux2Base):
    steps: int | None = None
    guidance: float | None = None

    def _steps_guidance(self) -> tuple[int | None, float | None]:
        return self.steps, self.guidance


class _Flux3Base(_FlexBase):
    """BFL's FLUX 3 shape: ``images`` (1-10), ``aspect_ratio`` (``auto``, ``match_first_image`` or W:H),
    ``resolution``, ``grounding``; FLUX.2's ``input_image...`` and ``width``/``height`` still work."""

    images: list[str] | None = Field(default=None, min_length=1, max_length=KINDS["flux3"].max_images)
    aspect_ratio: str | None = None
    resolution: Literal["768sq", "1k", "1.5k", "2k", "4k"] | None = None
    grounding: bool = False  # web search before generating: a hosted feature

    def hosted(self) -> dict[str, Any]:
        return {"grounding": True} if self.grounding else {}

    async def _sized_inputs(self, services: Services, owner: str, model: ModelSpec) -> tuple[Inputs, int, int]:
        if self.grounding and model.is_local:
            raise InvalidInput(
                "grounding (web search) is not available on this server's own models; send grounding: false.",
                param="grounding",
            )
        if self.aspect_ratio is None and self.resolution is None and not self.images:
            return await super()._sized_inputs(services, owner, model)  # FLUX.2's shape
        named = [(image_field(i), getattr(self, image_field(i))) for i in range(1, KINDS["flux3"].max_images + 1)]
        aliases = [(n, v) for n, v in named if v]
        if self.images and aliases:
            raise InvalidInput(f"Send images or {aliases[0][0]}, not both.", param="images")
        values = [(f"images[{i}]", v) for i, v in enumerate(self.images)] if self.images else aliases
        for name in ("width", "height"):
            if getattr(self, name) and (self.aspect_ratio or self.resolution):
                raise InvalidInput(f"{name} goes with FLUX.2's shape; with FLUX 3's, send resolution.", param=name)
        inputs, _, _ = await image_and_size(services, owner, model, values, aspect_ratio="1:1", aspect_explicit=True)
        first = inputs.images[0].size if inputs.images else None
        return inputs, *self._size(model, first)

    def _size(self, model: ModelSpec, first: tuple[int, int] | None) -> tuple[int, int]:
        resolution = self.resolution or "1k"
        pixels = RESOLUTIONS[resolution]
        if pixels > model.max_pixels:
            allowed = [r for r, p in RESOLUTIONS.items() if p <= model.max_pixels]
            raise InvalidInput(
                f"resolution {resolution!r} is {pixels / 1e6:.1f} MP; {model.name} makes at most "
                f"{model.max_pixels / 1e6:.1f} MP here: use {', '.join(allowed)}.",
                param="resolution",
            )
        aspect = self.aspect_ratio or "auto"
        if resolution == "768sq":
            if aspect not in ("auto", "1:1"):
                raise InvalidInput(
                    f"resolution '768sq' is square; aspect_ratio {aspect!r} is not.", param="aspect_ratio"
                )
            return 768, 768
        if aspect == "match_first_image" and first is None:
            raise InvalidInput("aspect_ratio 'match_first_image' needs an image in images.", param="aspect_ratio")
        # A W:H ratio is checked for its form and the 21:9-9:21 range by ratio_size.
        rw, rh = (first or (1, 1)) if aspect in ("auto", "match_first_image") else ratio_size(aspect)
        # The pixels asked for at that ratio, within the model's longest side, never rounded up past them.
        w = (pixels * rw / rh) ** 0.5
        scale = min(1.0, model.max_side / max(w, w * rh / rw))
        step = model.side_multiple
        width, height = (max(model.min_side, int(side * scale // step) * step) for side in (w, w * rh / rw))
        return width, height


Flux2ProInputs = _flux2_schema("Flux2ProInputs", 8)
Flux2FlexInputs = _flux2_schema("Flux2FlexInputs", 8, _FlexBase)
Flux2KleinInputs = _flux2_schema("Flux2KleinInputs", 4)
Flux3Inputs = _flux2_schema("Flux3Inputs", KINDS["flux3"].max_images, _Flux3Base)


class Flux31Inputs(Flux3Inputs):  # type: ignore[valid-type,misc]
    """FLUX 3.1 (hosted only): ``mode``, a resolution up to 16 MP or an exact width/height, ``bounding_boxes``,
    ``search``. BFL refuses seed and steps for it: sent here, they are named as ignored and not passed on."""

    mode: Literal["fast", "quality"] | None = None
    bounding_boxes: list[dict[str, Any]] | None = Field(default=None, max_length=32)
    search: bool | None = None
    # FLUX 3.1's inpainting mask (a URL or base64 image), for the provider: passed on as sent, never fetched here.
    mask: str | None = Field(default=None, max_length=30 * 1024 * 1024)

    def hosted(self) -> dict[str, Any]:
        fields = {"mode": self.mode, "bounding_boxes": self.bounding_boxes, "search": self.search, "mask": self.mask}
        base: dict[str, Any] = super().hosted()
        return base | {k: v for k, v in fields.items() if v is not None}

    def unapplied(self) -> list[str]:
        return [n for n in ("seed", "steps") if getattr(self, n) is not None]


ENDPOINTS: dict[str, tuple[str, type[_Common]]] = {
    "flux-dev": ("flux-dev", DevInputs),
    "flux-pro": ("flux-pro", ProInputs),
    "flux-pro-1.1": ("flux-pro", Pro11Inputs),
    "flux-kontext-pro": ("flux-kontext-pro", KontextInputs),
    "flux-kontext-max": ("flux-kontext-max", KontextInputs),
    "flux-2-pro": ("flux-2-pro", Flux2ProInputs),
    "flux-2-pro-preview": ("flux-2-pro", Flux2ProInputs),
    "flux-2-max": ("flux-2-max", Flux2ProInputs),
    "flux-2-flex": ("flux-2-flex", Flux2FlexInputs),
    "flux-2-klein-4b": ("flux-2-klein-4b", Flux2KleinInputs),
    "flux-2-klein-9b": ("flux-2-klein-9b", Flux2KleinInputs),
    # BFL's "latest klein 9B, with KV caching".
    "flux-2-klein-9b-preview": ("flux-2-klein-9b-kv", Flux2KleinInputs),
    "flux-3-image-klein": ("flux-3-image-klein", Flux3Inputs),
    "flux-3-image-klein-base": ("flux-3-image-klein-base", Flux3Inputs),
    # Hosted only: served where an upstream is configured for them (404 otherwise).
    "flux-3-image": ("flux-3-image", Flux3Inputs),
    "flux-3.1-image": ("flux-3.1-image", Flux31Inputs),
}
