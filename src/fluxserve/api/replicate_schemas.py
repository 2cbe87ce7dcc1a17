"""Replicate's FLUX input schemas, each turning itself into a GenerationSpec (``to_spec``).

Field names and wire formats are Replicate's; defaults and ranges of steps, guidance and sizes are the
model's (ModelSpec.make_spec checks them), so an operator's TOML reaches this dialect too.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidInput
from ..loras import LoraRequest
from ..models import ModelSpec
from ..spec import ASPECT_RATIOS, Adapter, GenerationSpec, fit_megapixel, output_quality
from .deps import Services
from .inputs import Inputs, image_and_size, resolve_loras

AspectRatio = Literal["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
assert set(AspectRatio.__args__) == set(ASPECT_RATIOS)  # type: ignore[attr-defined]
_FORMATS = {"jpg": "jpeg", "png": "png", "webp": "webp"}
# Our names -> Replicate's, for the messages make_spec writes.
_PARAMS = {
    "prompt": "input.prompt",
    "upsample": "input.prompt_upsampling",
    "steps": "input.num_inference_steps",
    "guidance": "input.guidance",
    "seed": "input.seed",
    "size": "input.width",
    "strength": "input.prompt_strength",
}


class _Input(BaseModel):
    # Unknown fields are dropped (and logged by the route), as replicate.com's cog does: @ai-sdk/replicate
    # sends `size` and `num_outputs` to every model. Known ones are checked strictly.
    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str
    seed: int | None = None

    async def to_spec(self, services: Services, owner: str, model: ModelSpec) -> tuple[GenerationSpec, Inputs]:
        """The spec and the decoded input images (stored only once the job is admitted)."""
        raise NotImplementedError

    async def _loras(self, services: Services, model: ModelSpec) -> tuple[Adapter, ...]:
        requests = self.lora_requests() if isinstance(self, _LoraFields) else []
        return await resolve_loras(services, model, requests, param="input.lora_weights")

    async def _sized(
        self,
        services: Services,
        owner: str,
        model: ModelSpec,
        values: list[tuple[str, str]],
        aspect: str,
        megapixels: str = "1",
    ) -> tuple[Inputs, int, int]:
        """The images and the size an aspect ratio (explicit only when the client sent one) gives them."""
        explicit = "aspect_ratio" in self.model_fields_set
        return await image_and_size(
            services,
            owner,
            model,
            values,
            aspect_ratio=aspect,
            aspect_explicit=explicit,
            megapixels=megapixels,
            aspect_param="input.aspect_ratio",
        )

    def _spec(
        self, model: ModelSpec, inputs: Inputs, size: tuple[int, int], loras: tuple[Adapter, ...], **fields: Any
    ) -> tuple[GenerationSpec, Inputs]:
        """What every schema's spec shares; ``fields``: the rest, by make_spec's names."""
        fields.setdefault("params", _PARAMS)
        # Replicate's two safety fields, on BFL's scale (GenerationSpec.safety_tolerance): off, or as sent.
        off = getattr(self, "disable_safety_checker", False)
        fields.setdefault("safety_tolerance", 6 if off else getattr(self, "safety_tolerance", 2))
        spec = model.make_spec(
            prompt=self.prompt, width=size[0], height=size[1], seed=self.seed, images=inputs.keys, loras=loras, **fields
        )
        return spec, inputs


def _custom_size(width: int | None, height: int | None) -> tuple[int, int]:
    if width is None or height is None:
        raise InvalidInput("aspect_ratio 'custom' needs input.width and input.height.", param="input.width")
    return width, height


class _LoraFields(BaseModel):
    """Replicate's LoRA fields (flux-dev-lora, flux-schnell-lora): an adapter and an optional second one."""

    lora_weights: str | None = None
    lora_scale: float = 1.0
    extra_lora: str | None = None
    extra_lora_scale: float = 1.0

    def lora_requests(self) -> list[LoraRequest]:
        pairs = [
            (self.lora_weights, self.lora_scale, "lora_weights", "lora_scale"),
            (self.extra_lora, self.extra_lora_scale, "extra_lora", "extra_lora_scale"),
        ]
        return [LoraRequest(w, sc, f"input.{wn}", f"input.{sn}") for w, sc, wn, sn in pairs if w is not None]


class SchnellInput(_Input):
    aspect_ratio: AspectRatio = "1:1"
    num_outputs: int = Field(default=1, ge=1, le=4)
    num_inference_steps: int | None = None
    output_format: Literal["webp", "jpg", "png"] = "webp"
    output_quality: int = Field(default=80, ge=0, le=100)
    disable_safety_checker: bool = False
    go_fast: bool = True  # accepted; fluxserve's default mode is already the exact one
    megapixels: Literal["1", "0.25"] = "1"

    def _image(self) -> list[tuple[str, str]]:
        return []

    async def to_spec(self, services: Services, owner: str, model: ModelSpec) -> tuple[GenerationSpec, Inputs]:
        loras = await self._loras(services, model)
        values = self._image()
        inputs, width, height = await self._sized(services, owner, model, values, self.aspect_ratio, self.megapixels)
        return self._spec(
            model,
            inputs,
            (width, height),
            loras,
            num_images=self.num_outputs,
            steps=self.num_inference_steps,
            guidance=getattr(self, "guidance", None),
            output_format=_FORMATS[self.output_format],
            quality=output_quality(self.output_quality),
            strength=getattr(self, "prompt_strength", None) if values else None,
        )


class DevInput(SchnellInput):
    guidance: float | None = None
    image: str | None = None
    prompt_strength: float = Field(default=0.8, ge=0, le=1)

    def _image(self) -> list[tuple[str, str]]:
        return [("input.image", self.image)] if self.image else []


class Pro11Input(_Input):
    aspect_ratio: AspectRatio | Literal["custom"] = "1:1"
    width: int | None = None
    height: int | None = None
    safety_tolerance: int = Field(default=2, ge=1, le=6)
    prompt_upsampling: bool = False
    output_format: Literal["webp", "jpg", "png"] = "webp"
    output_quality: int = Field(default=80, ge=0, le=100)
    image_prompt: str | None = None  # Redux: refused with a clear message

    def _steps_guidance(self) -> tuple[int | None, float | None]:
        return None, None

    async def to_spec(self, services: Services, owner: str, model: ModelSpec) -> tuple[GenerationSpec, Inputs]:
        loras = await self._loras(services, model)
        if self.image_prompt:
            raise InvalidInput(
                "input.image_prompt (Redux) is not supported by this server.", param="input.image_prompt"
            )
        if self.aspect_ratio == "custom":
            inputs, (width, height) = Inputs([]), _custom_size(self.width, self.height)
        else:
            inputs, width, height = await self._sized(services, owner, model, [], self.aspect_ratio)
        steps, guidance = self._steps_guidance()
        return self._spec(
            model,
            inputs,
            (width, height),
            loras,
            steps=steps,
            guidance=guidance,
            output_format=_FORMATS[self.output_format],
            quality=output_quality(self.output_quality),
        )


class ProInput(Pro11Input):
    steps: int | None = None
    guidance: float | None = None
    interval: float = Field(default=2, ge=1, le=4)

    def _steps_guidance(self) -> tuple[int | None, float | None]:
        return self.steps, self.guidance


class SchnellLoraInput(SchnellInput, _LoraFields):
    pass


class DevLoraInput(DevInput, _LoraFields):
    pass


class KontextInput(_Input):
    input_image: str | None = None
    aspect_ratio: AspectRatio | Literal["match_input_image"] = "match_input_image"
    prompt_upsampling: bool = False
    safety_tolerance: int = Field(default=2, ge=0, le=6)
    output_format: Literal["jpg", "png"] = "png"

    async def to_spec(self, services: Services, owner: str, model: ModelSpec) -> tuple[GenerationSpec, Inputs]:
        loras = await self._loras(services, model)
        values = [("input.input_image", self.input_image)] if self.input_image else []
        if values and self.safety_tolerance > 2:
            raise InvalidInput(
                "input.safety_tolerance can be at most 2 with an input image.", param="input.safety_tolerance"
            )
        # Kontext without an input image generates from text.
        aspect = "1:1" if self.aspect_ratio == "match_input_image" and not values else self.aspect_ratio
        inputs, width, height = await self._sized(services, owner, model, values, aspect)
        return self._spec(model, inputs, (width, height), loras, output_format=_FORMATS[self.output_format])


Flux2Aspect = AspectRatio | Literal["match_input_image", "custom"]


class _Flux2Base(_Input, _LoraFields):
    """FLUX.2's sizes: an aspect ratio at a resolution, the first reference's, or custom width/height."""

    refs_field: ClassVar[str] = "input_images"

    def _refs(self) -> list[str]:
        raise NotImplementedError

    def _megapixels(self) -> str:
        raise NotImplementedError

    def _steps_guidance(self) -> tuple[int | None, float | None]:
        return None, None

    async def _sized_inputs(self, services: Services, owner: str, model: ModelSpec) -> tuple[Inputs, int, int]:
        values = [(f"input.{self.refs_field}[{i}]", v) for i, v in enumerate(self._refs())]
        aspect: str = getattr(self, "aspect_ratio", "1:1")
        if aspect == "custom":
            width, height = _custom_size(getattr(self, "width", None), getattr(self, "height", None))
            inputs, _, _ = await image_and_size(
                services, owner, model, values, aspect_ratio="1:1", aspect_explicit=True
            )
            return inputs, width, height
        return await image_and_size(
            services,
            owner,
            model,
            values,
            aspect_ratio=aspect,
            aspect_explicit=True,
            megapixels=self._megapixels(),
            aspect_param="input.aspect_ratio",
        )

    async def to_spec(self, services: Services, owner: str, model: ModelSpec) -> tuple[GenerationSpec, Inputs]:
        loras = await self._loras(services, model)
        inputs, width, height = await self._sized_inputs(services, owner, model)
        steps, guidance = self._steps_guidance()
        return self._spec(
            model,
            inputs,
            (width, height),
            loras,
            steps=steps,
            guidance=guidance,
            output_format=_FORMATS[getattr(self, "output_format", "png")],
            quality=output_quality(getattr(self, "output_quality", None)),
            params={**_PARAMS, "steps": "input.steps", "image": f"input.{self.refs_field}"},
            upsample=getattr(self, "prompt_upsampling", False),
        )


class Flux2Input(_Flux2Base):
    """black-forest-labs/flux-2-{dev,pro,max}: references in ``input_images``, one output URI."""

    input_images: list[str] = Field(default_factory=list)
    aspect_ratio: Flux2Aspect = "1:1"
    resolution: Literal["0.5 MP", "1 MP", "2 MP", "4 MP", "match_input_image"] = "1 MP"
    width: int | None = None
    height: int | None = None
    safety_tolerance: int = Field(default=2, ge=1, le=5)
    output_format: Literal["webp", "jpg", "png"] = "webp"
    output_quality: int = Field(default=80, ge=0, le=100)
    go_fast: bool = True  # accepted (flux-2-dev); the default mode is already the exact one
    disable_safety_checker: bool = False

    def _refs(self) -> list[str]:
        return self.input_images

    def _megapixels(self) -> str:
        return "1" if self.resolution == "match_input_image" else self.resolution.split()[0]

    async def _sized_inputs(self, services: Services, owner: str, model: ModelSpec) -> tuple[Inputs, int, int]:
        inputs, width, height = await super()._sized_inputs(services, owner, model)
        if self.aspect_ratio != "custom" and self.resolution == "match_input_image" and inputs.images:
            first = inputs.images[0]
            width, height = fit_megapixel(*first.size, target=first.width * first.height)
        return inputs, width, height


class Flux2FlexInput(Flux2Input):
    """flux-2-flex: the FLUX.2 whose steps and guidance clients set."""

    steps: int | None = None
    guidance: float | None = None
    prompt_upsampling: bool = True  # accepted: FLUX.2 has no prompt upsampler here (a no-op)

    def _steps_guidance(self) -> tuple[int | None, float | None]:
        return self.steps, self.guidance


class KleinInput(_Flux2Base):
    """black-forest-labs/flux-2-klein-*: references in ``images``, an array of output URIs."""

    refs_field: ClassVar[str] = "images"
    images: list[str] = Field(default_factory=list)
    aspect_ratio: AspectRatio | Literal["match_input_image"] = "1:1"
    output_megapixels: Literal["0.25", "0.5", "1", "2", "4"] = "1"
    output_format: Literal["webp", "jpg", "png"] = "jpg"
    output_quality: int = Field(default=95, ge=0, le=100)
    go_fast: bool = False
    disable_safety_checker: bool = False

    def _refs(self) -> list[str]:
        return self.images

    def _megapixels(self) -> str:
        return self.output_megapixels


class Flux3Input(KleinInput):
    """black-forest-labs/flux-3-image-klein(-base): klein's shape (``images``, an array of URIs), up to 10
    references, steps and guidance (the base model's) set by the client."""

    num_inference_steps: int | None = None
    guidance: float | None = None
    prompt_upsampling: bool = False

    def _steps_guidance(self) -> tuple[int | None, float | None]:
        return self.num_inference_steps, self.guidance


# Replicate model name -> (fluxserve model, input schema, output is a list?)
MODELS: dict[str, tuple[str, type[_Input], bool]] = {
    "flux-schnell": ("flux-schnell", SchnellInput, True),
    "flux-dev": ("flux-dev", DevInput, True),
    "flux-schnell-lora": ("flux-schnell", SchnellLoraInput, True),
    "flux-dev-lora": ("flux-dev", DevLoraInput, True),
    "flux-pro": ("flux-pro", ProInput, False),
    "flux-1.1-pro": ("flux-pro", Pro11Input, False),
    "flux-kontext-pro": ("flux-kontext-pro", KontextInput, False),
    "flux-kontext-max": ("flux-kontext-max", KontextInput, False),
    "flux-2-dev": ("flux-2-dev", Flux2Input, False),
    "flux-2-pro": ("flux-2-pro", Flux2Input, False),
    "flux-2-max": ("flux-2-max", Flux2Input, False),
    "flux-2-flex": ("flux-2-flex", Flux2FlexInput, False),
    "flux-2-klein-4b": ("flux-2-klein-4b", KleinInput, True),
    "flux-2-klein-9b": ("flux-2-klein-9b", KleinInput, True),
    "flux-3-image-klein": ("flux-3-image-klein", Flux3Input, True),
    "flux-3-image-klein-base": ("flux-3-image-klein-base", Flux3Input, True),
    # Hosted only (served where an upstream is configured for them): klein's input shape, BFL's FLUX 3 shape out.
    "flux-3-image": ("flux-3-image", Flux3Input, True),
    "flux-3.1-image": ("flux-3.1-image", Flux3Input, True),
}

WebhookEvent = Literal["start", "output", "logs", "completed"]


class ModelPredictionRequest(BaseModel):
    """The body of /v1/models/{owner}/{name}/predictions as documented (the input is per model)."""

    input: dict[str, Any]
    webhook: str | None = Field(default=None, max_length=2083)
    # Four event names; a 28 MB filter was stored in the job row and re-read at every transition.
    webhook_events_filter: list[WebhookEvent] | None = Field(default=None, max_length=8)


class PredictionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: str | None = Field(default=None, max_length=256)
    input: dict[str, Any]
    webhook: str | None = Field(default=None, max_length=2083)
    # Four event names; a 28 MB filter was stored in the job row and re-read at every transition.
    webhook_events_filter: list[WebhookEvent] | None = Field(default=None, max_length=8)
    stream: bool | None = None  # deprecated by Replicate; every prediction has urls.stream
