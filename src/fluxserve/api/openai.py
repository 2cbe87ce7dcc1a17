"""The OpenAI Images dialect: /v1/images/generations and /v1/models."""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import GenerationFailed
from ..jobs import Job, Status
from ..spec import GenerationSpec, parse_size
from .deps import OwnerDep, Services, ServicesDep
from .errors import read_json

router = APIRouter(prefix="/v1")

DEFAULT_MODEL = "flux"


class ImageGenerationRequest(BaseModel):
    # Unknown GPT-image fields are accepted and ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str
    model: str | None = None
    n: int | None = Field(default=None, ge=1, le=10)
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["low", "auto"] | None = None
    user: str | None = None
    stream: Literal[False] | None = None
    # fluxserve extensions
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None


@router.post("/images/generations")
async def create_image(request: Request, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    body = await read_json(request, ImageGenerationRequest)
    model = services.registry.get(body.model or DEFAULT_MODEL)
    width, height = parse_size(body.size)
    fmt = body.output_format or "png"
    spec = model.make_spec(
        prompt=body.prompt,
        width=width,
        height=height,
        num_images=body.n or 1,
        steps=body.steps,
        guidance=body.guidance,
        seed=body.seed,
        output_format=fmt,
        quality=max(1, body.output_compression if body.output_compression is not None else 100),
    )
    echo = body.model_dump(exclude_none=True)
    return await run_and_render(services, owner, spec, echo, body.response_format, body.quality)


async def run_and_render(
    services: Services,
    owner: str,
    spec: GenerationSpec,
    echo: dict[str, Any],
    response_format: str | None,
    quality: str | None,
) -> dict[str, Any]:
    """The synchronous OpenAI call: a job like any other, waited on, rendered as an images response."""
    job = services.jobs.submit(owner, "openai", spec, echo)
    job = await services.jobs.wait(job.id, owner)
    if job.status is not Status.SUCCEEDED:
        raise GenerationFailed(job.error or f"The image generation ended as {job.status.value}.")
    return {
        "created": int(job.created_at),
        "data": _image_data(services, job, response_format or "url"),
        "background": "opaque",
        "output_format": spec.output_format,
        "quality": quality or "auto",
        "size": f"{spec.width}x{spec.height}",
    }


def _image_data(services: Services, job: Job, response_format: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = []
    for out in job.outputs:
        item: dict[str, Any] = {"revised_prompt": job.spec.prompt, "seed": out.seed}
        if response_format == "b64_json":
            item["b64_json"] = base64.b64encode(services.storage.open(out.key).read_bytes()).decode()
        else:
            item["url"] = services.storage.url(out.key)
        data.append(item)
    return data


@router.get("/models")
async def list_models(services: ServicesDep, _owner: OwnerDep) -> dict[str, Any]:
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {
                "id": m.name,
                "object": "model",
                "created": created,
                "owned_by": "fluxserve-demo" if m.demo else "fluxserve",
                "description": m.label,
                "demo": m.demo,
            }
            for m in services.registry
        ],
    }
