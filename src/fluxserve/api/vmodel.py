"""The seed relay's task API: POST /vmodel/generate, GET /vmodel/feed/{id}."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidInput
from ..job import Job, Status
from .deps import OwnerDep, ServicesDep
from .errors import json_body, read_json
from .inputs import elide_inline_images, image_and_size, submit

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
    num_inference_steps: int | None = None
    guidance: float | None = Field(default=None, ge=0, le=10)
    megapixels: Literal["1", "0.25"] = "1"
    # Image inputs: `image` (flux-dev img2img, with prompt_strength) or `input_image` (Kontext); URL or data: URL.
    image: str | None = None
    input_image: str | None = None
    prompt_strength: float | None = Field(default=None, ge=0, le=1)
    # Replicate's flux-schnell fields, accepted so its clients work unchanged.
    go_fast: bool | None = None
    disable_safety_checker: bool | None = None


class VmodelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: VmodelInput


@router.post("/generate", openapi_extra=json_body(VmodelRequest))
async def generate(request: Request, services: ServicesDep, owner: OwnerDep) -> dict[str, str]:
    body = await read_json(request, VmodelRequest)
    model = services.registry.get(body.model)
    inp = body.input
    if inp.image is not None and inp.input_image is not None:
        raise InvalidInput("Send one of input.image and input.input_image, not both.", param="input.image")
    param = "input.image" if inp.image is not None else "input.input_image"
    value = inp.image if inp.image is not None else inp.input_image
    inputs, width, height = await image_and_size(
        services,
        model,
        [(param, value)] if value is not None else [],
        aspect_ratio=inp.aspect_ratio,
        aspect_explicit="aspect_ratio" in inp.model_fields_set,
        megapixels=inp.megapixels,
        aspect_param="input.aspect_ratio",
    )
    spec = model.make_spec(
        prompt=inp.prompt,
        width=width,
        height=height,
        num_images=inp.num_outputs,
        steps=inp.num_inference_steps,
        guidance=inp.guidance,
        seed=inp.seed,
        output_format=_FORMATS[inp.output_format],  # type: ignore[arg-type]
        quality=inp.output_quality,
        images=inputs.keys,
        strength=inp.prompt_strength,
        params={
            "image": param,
            "strength": "input.prompt_strength",
            "prompt": "input.prompt",
            "steps": "input.num_inference_steps",
            "guidance": "input.guidance",
            "seed": "input.seed",
        },
    )
    echo = {"model": body.model, "input": elide_inline_images(inp.model_dump(exclude_unset=True))}
    job = await submit(services, request, owner, "vmodel", spec, echo, inputs)
    return {"id": job.id}


@router.get("/feed/{job_id}")
async def feed(job_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    job = await services.jobs.get(job_id, owner, dialect="vmodel")
    return render(job, services.output_urls(job) if job.status is Status.SUCCEEDED else None)


def render(job: Job, urls: list[str] | None) -> dict[str, Any]:
    """The seed's fields exactly (the relay has no 'canceled': it reports 'failed'), then additions."""
    status = "failed" if job.status is Status.CANCELED else job.status.public
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
