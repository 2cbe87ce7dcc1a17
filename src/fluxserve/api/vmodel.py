"""The seed relay's task API: POST /vmodel/generate, GET /vmodel/feed/{id}."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidInput
from ..job import Job, Status
from ..loras import LoraRequest
from ..models import ModelSpec
from ..spec import GenerationSpec
from .deps import OwnerDep, Services, ServicesDep
from .dialect import Dialect, images_at
from .errors import json_body, read_json, render_openai
from .inputs import Inputs, elide_inline_images, image_and_size, resolve_loras, submit
from .lean import lean

router = APIRouter(prefix="/vmodel")

_FORMATS = {"jpg": "jpeg", "png": "png", "webp": "webp"}


class VmodelInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    num_outputs: int = Field(default=1, ge=1, le=4)
    aspect_ratio: str = "1:1"
    output_format: Literal["jpg", "png", "webp"] = "webp"
    output_quality: int = Field(default=80, ge=1, le=100)
    seed: int | None = None
    # Defaults and ranges are the model's (GET /v1/models): checked in ModelSpec.make_spec.
    num_inference_steps: int | None = None
    guidance: float | None = None
    megapixels: Literal["1", "0.25"] = "1"
    # Image inputs: `image` (flux-dev img2img, with prompt_strength), `input_image` (Kontext) or
    # `input_images` (several references: Kontext, FLUX.2); URL, data: URL or base64.
    image: str | None = None
    input_image: str | None = None
    input_images: list[str] | None = Field(default=None, min_length=1)
    prompt_strength: float | None = Field(default=None, ge=0, le=1)
    # A LoRA adapter (a LoRA-folder name, hub id or https URL) and its scale, as Replicate's *-lora models.
    lora_weights: str | None = None
    lora_scale: float = 1.0
    # Replicate's flux-schnell fields, accepted so its clients work unchanged.
    go_fast: bool | None = None
    disable_safety_checker: bool | None = None

    async def to_spec(self, services: Services, owner: str, model: ModelSpec) -> tuple[GenerationSpec, Inputs]:
        """The spec and the decoded input images (stored only once the job is admitted)."""
        given = [name for name in ("image", "input_image", "input_images") if getattr(self, name) is not None]
        if len(given) > 1:
            raise InvalidInput(
                f"Send one of input.image, input.input_image and input.input_images; got {', '.join(given)}.",
                param=f"input.{given[1]}",
            )
        if self.input_images is not None:
            values = [(f"input.input_images[{i}]", v) for i, v in enumerate(self.input_images)]
        elif given:
            values = [(f"input.{given[0]}", getattr(self, given[0]))]
        else:
            values = []
        param = values[0][0].split("[")[0] if values else "input.image"
        inputs, width, height = await image_and_size(
            services,
            owner,
            model,
            values,
            aspect_ratio=self.aspect_ratio,
            aspect_explicit="aspect_ratio" in self.model_fields_set,
            megapixels=self.megapixels,
            aspect_param="input.aspect_ratio",
        )
        lora = []
        if self.lora_weights is not None:
            lora = [LoraRequest(self.lora_weights, self.lora_scale, "input.lora_weights", "input.lora_scale")]
        loras = await resolve_loras(services, model, lora, param="input.lora_weights")
        spec = model.make_spec(
            prompt=self.prompt,
            width=width,
            height=height,
            num_images=self.num_outputs,
            steps=self.num_inference_steps,
            guidance=self.guidance,
            seed=self.seed,
            output_format=_FORMATS[self.output_format],  # type: ignore[arg-type]
            quality=self.output_quality,
            images=inputs.keys,
            strength=self.prompt_strength,
            loras=loras,
            safety_tolerance=6 if self.disable_safety_checker else 2,
            params={
                "image": param,
                "strength": "input.prompt_strength",
                "prompt": "input.prompt",
                "steps": "input.num_inference_steps",
                "guidance": "input.guidance",
                "seed": "input.seed",
            },
        )
        return spec, inputs


class VmodelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: VmodelInput


@router.post("/generate", openapi_extra=json_body(VmodelRequest))
@lean
async def generate(request: Request, services: ServicesDep, owner: OwnerDep) -> dict[str, str]:
    body = await read_json(request, VmodelRequest)
    model = services.registry.get(body.model)
    inp = body.input
    spec, inputs = await inp.to_spec(services, owner, model)
    echo = {"model": body.model, "input": elide_inline_images(inp.model_dump(exclude_unset=True))}
    job = await submit(services, request, owner, "vmodel", spec, echo, inputs)
    return {"id": job.id}


@router.get("/feed/{job_id}")
@lean
async def feed(job_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    job = await services.jobs.get(job_id, owner, dialect="vmodel")
    return render(job, services.output_urls(job) if job.status is Status.SUCCEEDED else None)


def render(job: Job, urls: list[str] | None) -> dict[str, Any]:
    """The seed's fields exactly (the relay has no 'canceled': it reports 'failed'), then additions."""
    status = "failed" if job.status is Status.CANCELED else job.public_status
    return {
        "id": job.id,
        "model": job.request["model"],
        "input": job.request["input"],
        "output": urls,
        "status": status,
        "error": job.error,
        "progress": {"step": job.progress_done, "total": job.progress_total},
        "queue_position": job.queue_position,
        "seeds": [o.seed for o in job.outputs] or job.spec.image_seeds(),
        "created_at": job.created_at,
        "started_at": job.started_at,
        "completed_at": job.completed_at,
    }


# The seed's relay answers its task API's errors in OpenAI's envelope.
DIALECT = Dialect(
    "vmodel",
    (router,),
    lambda path: path.startswith("/vmodel/"),
    render_openai,
    body_limit=images_at("/vmodel/generate"),
)
