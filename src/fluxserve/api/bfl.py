"""Black Forest Labs' API over the job core: POST /v1/flux-*, GET /v1/get_result."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from ..errors import InvalidInput, NotFound
from ..job import EventKind, Job, Status
from ..sealed import seal
from ..spec import ratio_size
from ..store import WebhookRules
from ..webhooks import check_webhook_url
from .deps import Services, ServicesDep, XKeyOwnerDep
from .errors import json_body, read_json
from .inputs import elide_inline_images, image_and_size, submit

# BFL calls its webhook once, when the task ends.
WEBHOOKS = WebhookRules(on={k: ("completed",) for k in EventKind if k.is_ending})
router = APIRouter(prefix="/v1")


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    seed: int | None = None
    prompt_upsampling: bool = False  # accepted; there is no prompt upsampler here
    safety_tolerance: int = Field(default=2, ge=0, le=6)  # accepted; no moderation model runs here
    output_format: Literal["jpeg", "png", "webp"] | None = "jpeg"
    webhook_url: str | None = Field(default=None, min_length=1, max_length=2083)
    webhook_secret: str | None = None


# Field names and wire formats are BFL's; steps, guidance and size limits are the model's
# (ModelSpec.make_spec), so an operator's TOML defaults reach this dialect too.
class Pro11Inputs(_Common):
    width: int = 1024
    height: int = 768
    image_prompt: str | None = None


class DevInputs(Pro11Inputs):
    steps: int | None = None
    guidance: float | None = None


class ProInputs(DevInputs):
    interval: float = Field(default=2, ge=1, le=4)


class KontextInputs(_Common):
    input_image: str | None = None
    input_image_2: str | None = None
    input_image_3: str | None = None
    input_image_4: str | None = None
    aspect_ratio: str | None = None
    output_format: Literal["jpeg", "png", "webp"] | None = "png"


class _Flux2Base(_Common):
    # 0 or absent: the first reference's aspect ratio at about 1 MP, or 1024x1024 without one.
    width: int | None = None
    height: int | None = None


def _flux2_schema(name: str, references: int, base: type[_Flux2Base] = _Flux2Base) -> type[_Flux2Base]:
    """input_image, input_image_2 ... input_image_N, as BFL documents each FLUX.2 endpoint."""
    fields: dict[str, Any] = {_image_field(i): (str | None, None) for i in range(1, references + 1)}
    return create_model(name, __base__=base, **fields)


def _image_field(i: int) -> str:
    return "input_image" if i == 1 else f"input_image_{i}"


class _FlexBase(_Flux2Base):
    steps: int | None = None
    guidance: float | None = None


Flux2ProInputs = _flux2_schema("Flux2ProInputs", 8)
Flux2FlexInputs = _flux2_schema("Flux2FlexInputs", 8, _FlexBase)
Flux2KleinInputs = _flux2_schema("Flux2KleinInputs", 4)

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
}


async def _create(endpoint: str, request: Request, services: Services, owner: str) -> dict[str, Any]:
    model_name, schema = ENDPOINTS[endpoint]
    if model_name not in services.registry:
        raise NotFound(f"/v1/{endpoint} is not served here.")
    body = await read_json(request, schema)
    model = services.registry.get(model_name)
    values: list[tuple[str, str]] = []
    if isinstance(body, KontextInputs):
        names = ("input_image", "input_image_2", "input_image_3", "input_image_4")
        values = [(n, getattr(body, n)) for n in names if getattr(body, n)]
        if body.aspect_ratio:
            width, height = ratio_size(body.aspect_ratio)
            inputs, _, _ = await image_and_size(services, model, values, aspect_ratio="1:1", aspect_explicit=True)
        else:
            inputs, width, height = await image_and_size(
                services, model, values, aspect_ratio="match_input_image" if values else "1:1", aspect_explicit=False
            )
    elif isinstance(body, _Flux2Base):
        count = sum(1 for name in type(body).model_fields if name.startswith("input_image"))
        values = [(_image_field(i), getattr(body, _image_field(i))) for i in range(1, count + 1)]
        values = [(n, v) for n, v in values if v]
        inputs, width, height = await image_and_size(
            services, model, values, aspect_ratio="match_input_image" if values else "1:1", aspect_explicit=False
        )
        if body.width or body.height:
            if not (body.width and body.height):
                missing = "height" if body.width else "width"
                raise InvalidInput(f"Send width and height together; {missing} is missing.", param=missing)
            width, height = body.width, body.height
    else:
        assert isinstance(body, Pro11Inputs)
        if body.image_prompt:
            raise InvalidInput("image_prompt (Redux) is not supported by this server.", param="image_prompt")
        inputs, _, _ = await image_and_size(services, model, [], aspect_ratio="1:1", aspect_explicit=True)
        width, height = body.width, body.height
    spec = model.make_spec(
        prompt=body.prompt,
        width=width,
        height=height,
        steps=getattr(body, "steps", None),
        guidance=getattr(body, "guidance", None),
        seed=body.seed,
        output_format=body.output_format or "jpeg",
        quality=95,
        images=inputs.keys,
        params={"size": "width", "height": "height"},
    )
    webhook = None
    if body.webhook_url:
        await services.jobs.run(
            check_webhook_url, body.webhook_url, param="webhook_url", allow_private=services.settings.allow_private_urls
        )
        secret = seal(services.secret, body.webhook_secret) if body.webhook_secret else None
        webhook = {"url": body.webhook_url, "events": ["completed"], "secret": secret}
    echo = {
        "endpoint": endpoint,
        "input": elide_inline_images(body.model_dump(exclude_unset=True, exclude={"webhook_secret"})),
    }
    job = await submit(services, request, owner, "bfl", spec, echo, inputs, webhook=webhook)
    polling_url = f"{services.settings.base_url}/v1/get_result?id={job.id}"
    mp = round(width * height / 1_000_000, 2)
    response: dict[str, Any] = {
        "id": job.id,
        "polling_url": polling_url,
        "cost": None,
        "input_mp": None,
        "output_mp": mp,
    }
    if webhook:
        response |= {"status": "Pending", "webhook_url": body.webhook_url}
    return response


def _router_for(endpoint: str) -> None:
    async def create(request: Request, services: ServicesDep, owner: XKeyOwnerDep) -> dict[str, Any]:
        return await _create(endpoint, request, services, owner)

    create.__name__ = f"create_{endpoint.replace('-', '_').replace('.', '_')}"
    router.add_api_route(f"/{endpoint}", create, methods=["POST"], openapi_extra=json_body(ENDPOINTS[endpoint][1]))


for _endpoint in ENDPOINTS:
    _router_for(_endpoint)


_STATUS = {
    Status.QUEUED: "Pending",
    Status.PROCESSING: "Pending",
    Status.SUCCEEDED: "Ready",
    Status.FAILED: "Error",
    Status.CANCELED: "Error",
    Status.ABORTED: "Error",
}


def render(services: Services, job: Job) -> dict[str, Any]:
    result = None
    if job.status is Status.SUCCEEDED:
        out = job.outputs[0]
        result = {
            "sample": services.storage.url(out.key),
            "prompt": job.spec.prompt,
            "seed": out.seed,
            "start_time": job.started_at,
            "end_time": job.completed_at,
            "duration": round((job.completed_at or 0) - (job.started_at or 0), 3),
        }
    elif job.status.is_terminal:
        result = {"error": job.error}
    details: dict[str, Any] = {
        "queue_position": job.queue_position,
        "steps": job.progress_done,
        "total": job.progress_total,
    }
    return {
        "id": job.id,
        "status": _STATUS[job.status],
        "result": result,
        "progress": round(job.progress, 4),
        "details": details,
        "preview": None,
    }


def render_webhook(services: Services, job: Job) -> dict[str, Any]:
    return {**render(services, job), "task_id": job.id}


@router.get("/get_result")
async def get_result(services: ServicesDep, owner: XKeyOwnerDep, id: str = "") -> Any:
    try:
        job: Job | None = await services.jobs.get(id, owner, dialect="bfl")
    except NotFound:
        job = None
    if job is None:
        return JSONResponse({"id": id, "status": "Task not found", "result": None, "progress": None}, status_code=404)
    return render(services, job)
