"""fal's queue API (queue.fal.run), as fal-client and fal's docs shape it, under ``/fal-ai``.

``POST /fal-ai/{app}`` (``flux/dev``, ``flux-pro/kontext``...) queues a job: ``{request_id, status_url,
response_url, cancel_url}``. Its URLs drop the app's sub-path as fal's do: ``/fal-ai/{alias}/requests/{id}``
(the result), ``.../status`` (``IN_QUEUE`` with ``queue_position``, ``IN_PROGRESS``, ``COMPLETED``; ``logs=1``
or ``logs=true`` fills ``logs``) and ``PUT .../cancel``; every answer names the job in ``x-fal-request-id``.
``sync_mode: true`` makes the result's images data URIs. fal's synchronous host (fal.run) is
``POST /fal-run/fal-ai/{app}``: the result itself, once ready. ``?fal_webhook=URL`` posts fal's webhook body when the
job ends (signed with Standard Webhooks headers, not fal's ED25519). Auth: ``Authorization: Key <key>``
or ``Bearer``.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers

from ..errors import ClientDisconnected, InvalidInput, NotFound, UpstreamFailed
from ..job import EventKind, Job, Status
from ..store import WebhookRules
from .deps import OwnerFrom, Services, ServicesDep, check_webhook
from .dialect import Dialect, images_at
from .errors import json_body, read_json, render_bfl
from .inputs import Inputs, LoraItem, known_fields, lora_items, resolve_loras, submit
from .lean import lean
from .uploads import images_from_values

router = APIRouter(prefix="/fal-ai")
# fal.run, the synchronous host, under a prefix of its own: fal-client and @ai-sdk/fal reach it by its URL.
run_router = APIRouter(prefix="/fal-run/fal-ai")
WEBHOOKS = WebhookRules(on={k: ("completed",) for k in EventKind if k.is_ending})

# fal's app ids (after fal-ai/) -> our names.
APPS = {
    "flux/schnell": "flux-schnell",
    "flux/dev": "flux-dev",
    "flux/dev/image-to-image": "flux-dev",
    "flux-pro": "flux-pro",
    "flux-pro/v1.1": "flux-pro",
    "flux-pro/kontext": "flux-kontext-pro",
    "flux-pro/kontext/max": "flux-kontext-max",
    "flux-pro/v1/fill": "flux-fill",
    "flux-2": "flux-2-dev",
    "flux-2/edit": "flux-2-dev",
    "flux-2-pro": "flux-2-pro",
    "flux-2-pro/edit": "flux-2-pro",
    "flux-2-flex": "flux-2-flex",
    "flux-2/klein/4b": "flux-2-klein-4b",
    "flux-2/klein/9b": "flux-2-klein-9b",
}
SIZES = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
_PARAMS = {
    "size": "image_size",
    "height": "image_size.height",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "image": "image_url",
    "strength": "strength",
}


def _fal_key(headers: Headers) -> str | None:
    """fal's ``Authorization: Key <key>``, or Bearer."""
    scheme, _, value = (headers.get("authorization") or "").partition(" ")
    key = value.strip() if scheme.lower() in ("key", "bearer") else None
    return key or None


Owner = Depends(OwnerFrom(_fal_key))


class Size(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    width: int
    height: int


class FalInput(BaseModel):
    model_config = ConfigDict(extra="allow")  # fal ignores fields an app does not take

    prompt: str = Field(max_length=32_000)
    image_size: Literal[tuple(SIZES)] | Size | None = None  # type: ignore[valid-type]
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_images: int = Field(default=1, ge=1, le=4)
    seed: int | None = None
    output_format: Literal["jpeg", "png"] = "jpeg"
    image_url: str | None = Field(default=None, max_length=70_000_000)
    image_urls: list[str] = Field(default_factory=list, max_length=16)
    strength: float | None = None
    loras: list[LoraItem] | None = Field(default=None, max_length=8)
    sync_mode: bool = False
    enable_safety_checker: bool = True  # false: the safety check off (tolerance 6), within the operator's bound

    async def to_spec(self, services: Services, owner: str, app: str) -> tuple[Any, Inputs]:
        model = services.registry.get(APPS[app])
        values = [("image_url", self.image_url)] if self.image_url else []
        values += [(f"image_urls[{i}]", u) for i, u in enumerate(self.image_urls)]
        if len(values) > model.image_limit:
            model.check_image_count(len(values), param=values[model.image_limit][0])
        inputs = Inputs(await images_from_values(values, services, owner))
        if isinstance(self.image_size, Size):
            width, height = self.image_size.width, self.image_size.height
        elif self.image_size is None and inputs.images:
            width, height = (s // 16 * 16 for s in inputs.images[0].size)
        else:
            width, height = SIZES[self.image_size or "landscape_4_3"]
        loras = await resolve_loras(services, model, lora_items(self.loras), param="loras")
        spec = model.make_spec(
            prompt=self.prompt,
            width=width,
            height=height,
            num_images=self.num_images,
            steps=self.num_inference_steps,
            guidance=self.guidance_scale,
            seed=self.seed,
            output_format=self.output_format,
            quality=95,
            images=inputs.keys,
            strength=self.strength if inputs.images and not model.takes_references else None,
            params=_PARAMS,
            loras=loras,
            safety_tolerance=2 if self.enable_safety_checker else 6,
        )
        return spec, inputs


def _alias(app: str) -> str:
    return app.split("/")[0]


def _urls(services: Services, job: Job) -> dict[str, str]:
    root = f"{services.settings.base_url}/fal-ai/{_alias(job.request['app'])}/requests/{job.id}"
    return {"status_url": f"{root}/status", "response_url": root, "cancel_url": f"{root}/cancel"}


def result_body(services: Services, job: Job, *, inline: bool = False) -> dict[str, Any]:
    images = []
    for out in job.outputs:
        mime = f"image/{out.format}"
        url = services.storage.url(out.key)
        if inline:
            url = f"data:{mime};base64,{base64.b64encode(services.storage.read(out.key)).decode()}"
        images.append({"url": url, "width": out.width, "height": out.height, "content_type": mime})
    run_s = (job.completed_at or 0) - (job.started_at or 0)
    return {
        "images": images,
        "seed": job.spec.seed,
        "has_nsfw_concepts": [False] * len(images),
        "prompt": job.spec.prompt,
        "timings": {"inference": round(run_s, 3)},
    }


async def _create(app: str, request: Request, services: Services, owner: str) -> tuple[Job, bool]:
    if app not in APPS:
        raise NotFound(f"fal-ai/{app} is not served here; served: {', '.join(f'fal-ai/{a}' for a in APPS)}.")
    if APPS[app] not in services.registry:
        raise NotFound(f"fal-ai/{app} ({APPS[app]}) is not served here.")
    body = await read_json(request, FalInput)
    webhook = None
    if hook := request.query_params.get("fal_webhook"):
        if len(hook) > 2083:
            raise InvalidInput("fal_webhook may be at most 2083 characters.", param="fal_webhook")
        await check_webhook(services, hook, param="fal_webhook")
        webhook = {"url": hook, "events": ["completed"]}
    spec, inputs = await body.to_spec(services, owner, app)
    echo = {"app": app, "input": known_fields(body, exclude={"image_url", "image_urls"})}
    deadline = _start_deadline(request.headers.get("x-fal-request-timeout"))
    retain_s = _retention(request.headers.get("x-fal-object-lifecycle-preference"), services.settings.retention_s)
    job = await submit(
        services, request, owner, "fal", spec, echo, inputs, webhook=webhook, deadline=deadline, retain_s=retain_s
    )
    return job, body.sync_mode


MAX_REQUEST_TIMEOUT_S = 7 * 24 * 3600.0


def _start_deadline(header: str | None) -> float | None:
    """X-Fal-Request-Timeout: seconds the request may wait to start; past them it is canceled (504)."""
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_REQUEST_TIMEOUT_S:  # NaN fails this too
        raise InvalidInput(
            f"X-Fal-Request-Timeout must be a number of seconds above 0 and at most {MAX_REQUEST_TIMEOUT_S:g}; "
            f"got {header[:32]!r}.",
            param="X-Fal-Request-Timeout",
        )
    return time.time() + seconds


LIFECYCLE = "X-Fal-Object-Lifecycle-Preference"
MAX_LIFECYCLE_S = 365 * 24 * 3600.0


def _retention(header: str | None, operator_s: float) -> float | None:
    """X-Fal-Object-Lifecycle-Preference: {"expiration_duration_seconds": N} keeps this request's files N
    seconds after it ends, never longer than the operator's retention (0 there: forever)."""
    if header is None:
        return None
    try:
        value = json.loads(header).get("expiration_duration_seconds")
    except (ValueError, AttributeError):
        value = None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_LIFECYCLE_S:
        raise InvalidInput(
            f'{LIFECYCLE} must be JSON such as {{"expiration_duration_seconds": 3600}} (0 up to a year); '
            f"got {header[:64]!r}.",
            param=LIFECYCLE,
        )
    return float(value) if operator_s <= 0 else min(float(value), operator_s)


def _timed_out(job: Job) -> JSONResponse | None:
    """fal's answer for a request whose X-Fal-Request-Timeout passed before it started."""
    if job.status is not Status.ABORTED:
        return None
    headers = {"x-fal-request-id": job.id, "X-Fal-Request-Timeout-Type": "user"}
    return JSONResponse({"detail": job.error or "Request timed out."}, status_code=504, headers=headers)


@router.post("/{app:path}", openapi_extra=json_body(FalInput))
@lean
async def create(app: str, request: Request, services: ServicesDep, owner: str = Owner) -> Any:
    """The queue (queue.fal.run): always a receipt. ``sync_mode`` makes the result's images data URIs."""
    job, _ = await _create(app, request, services, owner)
    receipt = {"request_id": job.id, **_urls(services, job), "queue_position": job.queue_position or 0}
    return JSONResponse(receipt, headers={"x-fal-request-id": job.id})


@run_router.post("/{app:path}", openapi_extra=json_body(FalInput))
@lean
async def run(app: str, request: Request, services: ServicesDep, owner: str = Owner) -> Any:
    """fal's synchronous run (fal.run): the result itself, once the images are ready; a client that leaves
    cancels its job, as the OpenAI route does."""
    job, inline = await _create(app, request, services, owner)
    while not job.status.is_terminal:
        job = await services.jobs.wait(job.id, owner, timeout=1.0, seen=job)
        if not job.status.is_terminal and await request.is_disconnected():
            await services.jobs.cancel(job.id, owner)
            raise ClientDisconnected("The client closed the connection before the images were ready.")
    headers = {"x-fal-request-id": job.id}
    if (timed_out := _timed_out(job)) is not None:
        return timed_out
    if job.status is not Status.SUCCEEDED:
        status = {"upstream_rejected": 422, UpstreamFailed.code: 502}.get(job.error_code or "", 500)
        return JSONResponse({"detail": job.error or job.status.value}, status_code=status, headers=headers)
    body = await services.jobs.run_slow(result_body, services, job, inline=inline)
    return JSONResponse(body, headers=headers)


async def _job(services: Services, alias: str, request_id: str, owner: str) -> Job:
    job = await services.jobs.get(request_id, owner, "fal")
    if _alias(job.request.get("app", "")) != alias:
        raise NotFound(f"No request {request_id!r} for fal-ai/{alias}.", param="request_id")
    return job


def status_body(services: Services, job: Job, logs: bool) -> dict[str, Any]:
    status = {Status.QUEUED: "IN_QUEUE", Status.PROCESSING: "IN_PROGRESS"}.get(job.status, "COMPLETED")
    body: dict[str, Any] = {"status": status, "request_id": job.id, **_urls(services, job)}
    if job.status is Status.QUEUED:
        body["queue_position"] = max(0, (job.queue_position or 1) - 1)
    # fal-client reads "logs" on every status: null unless asked for.
    body["logs"] = None
    if logs:
        body["logs"] = [{"message": line, "level": "INFO", "source": "user"} for line in job.log_lines()]
    if job.status.is_terminal:
        body["metrics"] = {"inference_time": round((job.completed_at or 0) - (job.started_at or 0), 3)}
        if job.status is not Status.SUCCEEDED:
            body["error"] = job.error
    return body


@router.get("/{alias}/requests/{request_id}/status")
@lean
async def get_status(
    alias: str, request_id: str, services: ServicesDep, owner: str = Owner, logs: bool = False
) -> JSONResponse:
    """``logs``: 1, true (fal-client sends ``logs=true``), or 0, false. 202 while queued or in progress, 200
    once completed, as fal answers."""
    job = await _job(services, alias, request_id, owner)
    return JSONResponse(status_body(services, job, logs), status_code=200 if job.status.is_terminal else 202)


@router.get("/{alias}/requests/{request_id}")
@lean
async def get_result(alias: str, request_id: str, services: ServicesDep, owner: str = Owner) -> Any:
    job = await _job(services, alias, request_id, owner)
    if not job.status.is_terminal:
        return JSONResponse({"detail": "Request is still in progress"}, status_code=400)
    if (timed_out := _timed_out(job)) is not None:
        return timed_out
    if job.status is not Status.SUCCEEDED:
        return JSONResponse({"detail": job.error or job.status.value}, status_code=422)
    inline = bool(job.request.get("input", {}).get("sync_mode"))
    return await services.jobs.run_slow(result_body, services, job, inline=inline)


@router.put("/{alias}/requests/{request_id}/cancel")
async def cancel(alias: str, request_id: str, services: ServicesDep, owner: str = Owner) -> Any:
    job = await _job(services, alias, request_id, owner)
    if job.status.is_terminal:
        return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
    await services.jobs.cancel(job.id, owner)
    return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)


def render_webhook(services: Services, job: Job) -> dict[str, Any]:
    """fal's webhook body: request_id, status OK/ERROR, the result as payload."""
    ok = job.status is Status.SUCCEEDED
    return {
        "request_id": job.id,
        "gateway_request_id": job.id,
        "status": "OK" if ok else "ERROR",
        "payload": result_body(services, job) if ok else None,
        "error": None if ok else job.error,
    }


DIALECT = Dialect(
    "fal",
    (router, run_router),
    lambda path: path.startswith(("/fal-ai/", "/fal-run/fal-ai/")),
    render_bfl,  # fal answers as FastAPI does: {"detail": [...]} for bad input, {"detail": "..."} otherwise
    render_webhook,
    webhook_rules=WEBHOOKS,
    body_limit=images_at("/fal-ai/", "/fal-run/fal-ai/"),
)
