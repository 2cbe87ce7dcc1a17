"""The OpenAI Images request schemas: generations' JSON and the fields edits share, and their specs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidInput
from ..models import ModelSpec
from ..spec import Adapter, GenerationSpec, output_quality, parse_size
from .deps import Services
from .inputs import LoraItem, known_fields, lora_items, resolve_loras

DEFAULT_MODEL = "flux"
__all__ = ["DEFAULT_MODEL", "ImageFields", "ImageGenerationRequest", "known_fields"]


Quality = Literal["auto", "low", "medium", "high", "standard", "hd", "xhigh", "max"]
# gpt-image-2.5's qualities above "high": more denoising steps than the model's default, within its range.
MORE_STEPS = {"xhigh": 1.5, "max": 2.0}
# Formats OpenAI's newer models make that are not produced here; asked for, they are refused by name.
NOT_PRODUCED = ("gif", "svg")


class ImageFields(BaseModel):
    """What generations and edits both take, and the spec they make of it."""

    prompt: str
    n: int | None = Field(default=None, ge=1, le=10)
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    quality: Quality | None = None
    # The successor of `user` (gpt-image-2.5 clients): the end user a request is for, kept with the job and
    # shown in usage (`GET /v1/usage?by=end_user`).
    safety_identifier: str | None = Field(default=None, max_length=256)
    # Animated output (gif frames): not produced here.
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    # fluxserve extensions
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    # new-api's async mode (as Prefer: respond-async): 202 with a task, then GET /v1/images/tasks/{id}.
    async_: bool | None = Field(default=None, alias="async")

    def make_spec(
        self, model: ModelSpec, width: int, height: int, loras: tuple[Adapter, ...], **extra: Any
    ) -> GenerationSpec:
        self._check_producible()
        # moderation=low: less restrictive filtering (on BFL's scale, GenerationSpec.safety_tolerance).
        extra.setdefault("safety_tolerance", 4 if getattr(self, "moderation", None) == "low" else 2)
        return model.make_spec(
            prompt=self.prompt,
            width=width,
            height=height,
            num_images=self.n or 1,
            steps=self.steps if self.steps is not None else quality_steps(model, self.quality),
            guidance=self.guidance,
            seed=self.seed,
            output_format=self.output_format or "png",  # type: ignore[arg-type]  # gif, svg refused above
            quality=output_quality(self.output_compression),
            loras=loras,
            **extra,
        )

    def _check_producible(self) -> None:
        if self.output_format in NOT_PRODUCED:
            raise InvalidInput(
                f"output_format {self.output_format!r} is not produced here; use png, jpeg or webp.",
                param="output_format",
                code="unsupported_output_format",
            )
        for name in ("frame_count", "frame_duration_ms"):
            if getattr(self, name) is not None:
                raise InvalidInput(
                    f"{name}: animated images are not produced here; send one still image per request.",
                    param=name,
                    code="unsupported_parameter",
                )


def quality_steps(model: ModelSpec, quality: str | None) -> int | None:
    """The steps a quality asks for: xhigh and max are more than the model's default, never past its maximum;
    the others leave the default (None)."""
    factor = MORE_STEPS.get(quality or "")
    return (
        None if factor is None else min(model.max_steps, max(model.default_steps, round(model.default_steps * factor)))
    )


class ImageGenerationRequest(ImageFields):
    # Unknown GPT-image fields are accepted and ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["low", "auto"] | None = None
    user: str | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    # fluxserve extensions
    loras: list[LoraItem] | None = None  # LoRA adapters for this request: [{"path", "scale"}]

    async def to_spec(self, services: Services, owner: str, model: ModelSpec) -> GenerationSpec:
        width, height = parse_size(self.size)
        loras = await resolve_loras(services, model, lora_items(self.loras), param="loras")
        return self.make_spec(model, width, height, loras)


def response_format(requested: str | None, model: str | None) -> str:
    """What the images come back as: as asked; else b64_json for gpt-image names (OpenAI answers those only
    so, and their clients, the AI SDK's among them, read b64_json), url for the rest (dall-e's default)."""
    if requested:
        return requested
    return "b64_json" if (model or "").startswith("gpt-image") else "url"
