"""Black Forest Labs' API over the job core: POST /v1/flux-*, GET /v1/get_result."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..engine.safety import FLAGGED_CODE
from ..errors import InvalidInput, NotFound
from ..job import EventKind, Job, Status
from ..sealed import seal, unseal
from ..store import WebhookRules
from .bfl_schemas import ENDPOINTS
from .deps import Services, ServicesDep, XKeyOwnerDep, check_webhook
from .dialect import Dialect, images_at
from .errors import json_body, read_json, render_bfl
from .inputs import elide_inline_images, known_fields, submit
from .lean import lean

# BFL calls its webhook once, when the task ends.
WEBHOOKS = WebhookRules(on={k: ("completed",) for k in EventKind if k.is_ending})
router = APIRouter(prefix="/v1")


async def _create(endpoint: str, request: Request, services: Services, owner: str) -> dict[str, Any]:
    model_name, schema = ENDPOINTS[endpoint]
    if model_name not in services.registry:
        raise NotFound(f"/v1/{endpoint} is not served here.")
    body = await read_json(request, schema)
    # Unknown fields are ignored as BFL does, but a reference image past the endpoint's is refused, not dropped.
    extra_refs = sorted((n for n in body.model_extra or {} if n.startswith("input_image")), key=len)
    if extra_refs:
        known = [n for n in type(body).model_fields if n.startswith("input_image")]
        raise InvalidInput(
            f"/v1/{endpoint} takes at most {len(known)} reference images ({', '.join(known)}); got {extra_refs[0]}.",
            param=extra_refs[0],
            code="too_many_images",
        )
    model = services.registry.get(model_name)
    spec, inputs = await body.to_spec(services, owner, model)
    webhook = None
    if body.webhook_url:
        await check_webhook(services, body.webhook_url, param="webhook_url")
        secret = seal(services.secret, body.webhook_secret) if body.webhook_secret else None
        webhook = {"url": body.webhook_url, "events": ["completed"], "secret": secret}
    given = known_fields(body, exclude={"webhook_secret", *body.unapplied()}, exclude_unset=True)
    if body.unapplied():
        given["ignored_fields"] = sorted([*given.get("ignored_fields", []), *body.unapplied()])
    echo = {"endpoint": endpoint, "input": elide_inline_images(given)}
    job = await submit(services, request, owner, "bfl", spec, echo, inputs, webhook=webhook)
    polling_url = f"{services.settings.base_url}/v1/get_result?id={job.id}"
    mp = round(spec.width * spec.height / 1_000_000, 2)
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
    body = json_body(ENDPOINTS[endpoint][1])
    router.add_api_route(f"/{endpoint}", lean(create), methods=["POST"], openapi_extra=body)


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
            "prompt": out.prompt or job.spec.prompt,  # FLUX 3's upsampler: the prompt as it rewrote it
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
    status = _STATUS[job.status]
    if job.status is Status.FAILED and job.error_code == FLAGGED_CODE:
        status = "Content Moderated"  # BFL's own status for an output its safety check withheld
    if job.status is Status.PROCESSING and job.spec.upsample and job.progress_done == 0:
        status = "Reasoning"  # FLUX 3: the prompt upsampler runs before the first step
    return {
        "id": job.id,
        "status": status,
        "result": result,
        "progress": round(job.progress, 4),
        "details": details,
        "preview": None,
    }


def render_webhook(services: Services, job: Job) -> dict[str, Any]:
    """BFL's webhook payload ({id, status, result: {sample, prompt, seed}, timestamp}), with get_result's other
    fields and task_id kept for receivers written against the earlier shape."""
    return {**render(services, job), "task_id": job.id, "timestamp": int(time.time())}


def sign_webhook(secret: str, body: bytes) -> dict[str, str]:
    """X-BFL-Signature: sha256=<hex HMAC-SHA256 of the raw body, keyed with the request's webhook_secret>."""
    return {"X-BFL-Signature": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}


@router.get("/get_result")
@lean
async def get_result(services: ServicesDep, owner: XKeyOwnerDep, id: str = "") -> Any:
    try:
        job: Job | None = await services.jobs.get(id, owner, dialect="bfl")
    except NotFound:
        job = None
    if job is None:
        return JSONResponse({"id": id, "status": "Task not found", "result": None, "progress": None}, status_code=404)
    return render(services, job)


def _webhook_secret(services: Services, job: Job) -> str | None:
    """BFL clients send their own secret per request; it is kept sealed in the job row."""
    sealed = (job.webhook or {}).get("secret")
    return unseal(services.secret, sealed) if sealed else None


DIALECT = Dialect(
    "bfl",
    (router,),
    lambda path: path.startswith(("/v1/flux-", "/v1/get_result")),
    render_bfl,
    render_webhook,
    _webhook_secret,
    webhook_headers=sign_webhook,
    webhook_rules=WEBHOOKS,
    body_limit=images_at("/v1/flux-"),
    prefix="/bfl",
)
