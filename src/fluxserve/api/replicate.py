"""Replicate's predictions API over the job core: create, get, list, cancel, wait, stream."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from .. import durations
from ..errors import Forbidden, InvalidInput, NotFound
from ..job import EventKind, Job, Status
from ..storage.base import expires_at
from ..store import WebhookRules
from ..webhooks import owner_secret
from . import replicate_files
from .bodylimit import IMAGE_JSON_BODY_BYTES, JSON_BODY_BYTES, UPLOAD_BODY_BYTES
from .deps import OwnerDep, Services, ServicesDep, check_webhook, require_owner
from .dialect import Dialect
from .errors import from_validation_errors, inline_schema, json_body, read_json, render_replicate
from .inputs import elide_inline_images, submit
from .lean import lean
from .paging import decode_cursor, encode_cursor
from .replicate_schemas import MODELS, ModelPredictionRequest, PredictionRequest
from .sse import sse_frame

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")

PAGE_SIZE = 100
OWNER = "black-forest-labs"

# Replicate's webhook events for each transition; logs and output at most every 0.5 s per prediction.
WEBHOOKS = WebhookRules(
    on={
        EventKind.STARTED: ("start",),
        EventKind.PROGRESS: ("logs",),
        EventKind.SUCCEEDED: ("output", "completed"),
        EventKind.FAILED: ("completed",),
        EventKind.CANCELED: ("completed",),
        EventKind.ABORTED: ("completed",),
    },
    throttled=frozenset({"logs", "output"}),
    throttle_s=0.5,
)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _status(job: Job) -> str:
    """A running prediction whose cancel was accepted is canceled from then on (its worker stops at the
    next step and JobService.complete ends it canceled even when its images were already made)."""
    if job.status is Status.PROCESSING and job.cancel_requested:
        return Status.CANCELED.value
    return job.public_status


def _stream_signature(secret: bytes, job_id: str, expires: int) -> str:
    return hmac.new(secret, f"stream:{job_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def stream_url(services: Services, job: Job) -> str:
    """A capability, like file URLs: replicate-js opens it with only an Accept header, no token."""
    expires = expires_at(services.settings.url_ttl_s)
    sig = _stream_signature(services.secret, job.id, expires)
    return f"{services.settings.base_url}/v1/predictions/{job.id}/stream?expires={expires}&sig={sig}"


def render(services: Services, job: Job) -> dict[str, Any]:
    base = services.settings.base_url
    output: Any = None
    if job.status is Status.SUCCEEDED:
        urls = services.output_urls(job)
        output = urls if job.request.get("list_output", True) else urls[0]
    metrics: dict[str, Any] = {"image_count": len(job.outputs)} if job.outputs else {}
    if job.started_at and job.completed_at:
        metrics["predict_time"] = round(job.completed_at - job.started_at, 3)
    if job.completed_at:
        metrics["total_time"] = round(job.completed_at - job.created_at, 3)
    return {
        "id": job.id,
        "model": job.request["model"],
        "version": "hidden",
        "input": job.request["input"],
        "output": output,
        "logs": "\n".join(job.log_lines()),
        "error": None if job.status is Status.CANCELED else job.error,
        "status": _status(job),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "completed_at": _iso(job.completed_at),
        "deadline": _iso(job.deadline),
        "data_removed": False,
        "source": "api",
        "metrics": metrics,
        "progress": {"current": job.progress_done, "total": job.progress_total, "percentage": round(job.progress, 4)},
        "queue_position": job.queue_position,
        "urls": {
            "get": f"{base}/v1/predictions/{job.id}",
            "cancel": f"{base}/v1/predictions/{job.id}/cancel",
            "stream": stream_url(services, job),
        },
    }


MAX_DURATION_S = 7 * 24 * 3600  # a deadline beyond a week means nothing to a queue; huge ones overflow dates
MIN_CANCEL_AFTER_S = 5.0


def parse_duration(value: str, *, param: str) -> float:
    """Go-style durations as Replicate takes them: '30s', '5m', '1h30m', '1.5s', '500ms'."""
    try:
        seconds = durations.parse_duration(value)
    except ValueError:
        raise InvalidInput(
            f"{param} must be a duration such as '30s', '5m' or '1h30m'; got {value!r}.", param=param
        ) from None
    if seconds <= 0:
        raise InvalidInput(f"{param} must be positive.", param=param)
    if seconds > MAX_DURATION_S:
        raise InvalidInput(f"{param} must be at most {MAX_DURATION_S // 3600}h; got {value!r}.", param=param)
    return seconds


def parse_prefer_wait(header: str | None) -> float | None:
    """'Prefer: wait' holds the request up to 60 s; 'wait=N' for N in 1..60. Other preferences are ignored."""
    if not header:
        return None
    for pref in (p.strip() for p in header.split(",")):
        name, equals, value = pref.partition("=")
        if name.strip().lower() != "wait":
            continue
        if not equals:
            return 60.0
        digits = value.strip()
        if not (digits.isascii() and digits.isdigit()) or not 1 <= int(digits) <= 60:  # "²" is a digit to isdigit
            raise InvalidInput(
                f"Prefer: wait={value} is invalid; use wait or wait=N with N from 1 to 60.", param="Prefer"
            )
        return float(value)
    return None


async def _create(request: Request, services: Services, owner: str, name: str, body: PredictionRequest) -> Any:
    model_name, schema, list_output = _served(services, name)
    model = services.registry.get(model_name)
    try:
        inp = schema.model_validate(body.input)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors()), prefix="input.") from exc
    if inp.model_extra:
        log.info("replicate %s: ignored input fields %s", name, sorted(k[:64] for k in inp.model_extra)[:20])
    spec, inputs = await inp.to_spec(services, owner, model)
    wait_s = parse_prefer_wait(request.headers.get("prefer"))
    cancel_after = request.headers.get("cancel-after")
    deadline = None
    if cancel_after:
        seconds = parse_duration(cancel_after, param="Cancel-After")
        if seconds < MIN_CANCEL_AFTER_S:  # replicate.com refuses shorter ones: a job can't start that fast
            raise InvalidInput(
                f"Cancel-After must be at least {MIN_CANCEL_AFTER_S:g}s; got {cancel_after!r}.", param="Cancel-After"
            )
        deadline = time.time() + seconds
    webhook = None
    if body.webhook:
        await check_webhook(services, body.webhook, param="webhook")
        events: list[str] = list(body.webhook_events_filter) if body.webhook_events_filter else list(WEBHOOKS.names)
        webhook = {"url": body.webhook, "events": events}
    echo = {"model": f"{OWNER}/{name}", "input": elide_inline_images(body.input), "list_output": list_output}
    fields = {"deadline": deadline, "webhook": webhook, "with_position": True}
    job = await submit(services, request, owner, "replicate", spec, echo, inputs, **fields)
    if wait_s is None:
        if job.queue_position is None:  # a replay of an earlier create: as that job is now
            job = await services.jobs.get(job.id, owner)
        return JSONResponse(render(services, job), status_code=201)
    job = await services.jobs.wait(job.id, owner, timeout=wait_s, seen=job)
    answer = render(services, job)
    if not job.status.is_terminal:
        # As replicate.com: a blocking create that is not done when the wait ends says "starting", which
        # replicate-python's run() takes as "poll on" (any other status it returns as final: None).
        answer["status"] = "starting"
    return JSONResponse(answer, status_code=201)


@router.post("/models/{owner_name}/{name}/predictions", openapi_extra=json_body(ModelPredictionRequest))
@lean
async def create_model_prediction(
    owner_name: str, name: str, request: Request, services: ServicesDep, owner: OwnerDep
) -> Any:
    body = await read_json(request, PredictionRequest)
    if owner_name != OWNER:
        raise NotFound(f"Model {owner_name}/{name} is not served here.", param="model")
    return await _create(request, services, owner, name, body)


@router.post("/predictions", openapi_extra=json_body(PredictionRequest))
@lean
async def create_prediction(request: Request, services: ServicesDep, owner: OwnerDep) -> Any:
    body = await read_json(request, PredictionRequest)
    if not body.version:
        raise InvalidInput("Missing required parameter 'version' (owner/name or owner/name:version).", param="version")
    ref = body.version.split(":", 1)[0]
    by_version = {_version_id(n): n for n in MODELS}
    # A bare version id, as replicate clients send for owner/name:version references.
    owner_name, _, name = (OWNER, "", by_version[ref]) if ref in by_version else ref.partition("/")
    if owner_name != OWNER or not name:
        raise InvalidInput(
            f"version {body.version!r} is not a model served here; use {OWNER}/NAME, e.g. {OWNER}/flux-schnell.",
            param="version",
        )
    return await _create(request, services, owner, name, body)


def _version_id(name: str) -> str:
    """Stable per model name: what Replicate clients pin as owner/name:version."""
    return hashlib.sha256(f"fluxserve:{OWNER}/{name}".encode()).hexdigest()


def _served(services: Services, name: str) -> tuple[str, type[Any], bool]:
    if name not in MODELS or MODELS[name][0] not in services.registry:
        raise NotFound(
            f"Model {OWNER}/{name} is not served here; available: "
            + ", ".join(f"{OWNER}/{m}" for m, (n, _, _) in MODELS.items() if n in services.registry),
            param="model",
        )
    return MODELS[name]


def _version(services: Services, name: str) -> dict[str, Any]:
    """Replicate's version object; its input schema is the dialect's, with the registry's defaults and ranges."""
    model_name, schema, list_output = _served(services, name)
    facts = services.registry.get(model_name).facts()
    inputs = inline_schema(schema)
    props = inputs.get("properties", {})
    for field in ("num_inference_steps", "steps"):
        if field in props:
            props[field] |= {"default": facts["steps"]["default"], "minimum": 1, "maximum": facts["steps"]["max"]}
    if "guidance" in props and facts["guidance"]:
        g = facts["guidance"]
        props["guidance"] |= {"default": g["default"], "minimum": g["min"], "maximum": g["max"]}
    uri = {"type": "string", "format": "uri"}
    output = {"type": "array", "items": uri} if list_output else uri
    return {
        "id": _version_id(name),
        "created_at": _iso(services.started_at),
        "cog_version": "fluxserve",
        "openapi_schema": {"components": {"schemas": {"Input": inputs, "Output": output}}},
    }


def _model_object(services: Services, name: str) -> dict[str, Any]:
    model = services.registry.get(_served(services, name)[0])
    return {
        "url": f"{services.settings.base_url}/v1/models/{OWNER}/{name}",
        "owner": OWNER,
        "name": name,
        "description": model.label,
        "visibility": "public",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": _version(services, name),
    }


def _check_owner(owner_name: str, name: str) -> None:
    if owner_name != OWNER:
        raise NotFound(f"Model {owner_name}/{name} is not served here.", param="model")


@router.get("/models/{owner_name}/{name}")
async def get_model(owner_name: str, name: str, services: ServicesDep, _owner: OwnerDep) -> dict[str, Any]:
    _check_owner(owner_name, name)
    return _model_object(services, name)


@router.get("/models/{owner_name}/{name}/versions")
async def list_versions(owner_name: str, name: str, services: ServicesDep, _owner: OwnerDep) -> dict[str, Any]:
    _check_owner(owner_name, name)
    return {"next": None, "previous": None, "results": [_version(services, name)]}


@router.get("/models/{owner_name}/{name}/versions/{version_id}")
async def get_version(
    owner_name: str, name: str, version_id: str, services: ServicesDep, _owner: OwnerDep
) -> dict[str, Any]:
    _check_owner(owner_name, name)
    if version_id != _version_id(name):
        raise NotFound(f"Model {OWNER}/{name} has no version {version_id!r}.", param="version")
    return _version(services, name)


async def _replicate_job(services: Services, job_id: str, owner: str) -> Job:
    return await services.jobs.get(job_id, owner, dialect="replicate")


@router.get("/predictions/{job_id}")
@lean
async def get_prediction(job_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    return render(services, await _replicate_job(services, job_id, owner))


@router.post("/predictions/{job_id}/cancel")
async def cancel_prediction(job_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    return render(services, await services.jobs.cancel(job_id, owner, dialect="replicate"))


@router.get("/predictions")
async def list_predictions(services: ServicesDep, owner: OwnerDep, cursor: str | None = None) -> dict[str, Any]:
    before = decode_cursor(cursor) if cursor else None
    jobs = await services.jobs.list(owner, "replicate", before=before, limit=PAGE_SIZE + 1)
    page, more = jobs[:PAGE_SIZE], len(jobs) > PAGE_SIZE
    next_url = None
    if more:
        last = page[-1]
        next_url = f"{services.settings.base_url}/v1/predictions?cursor={encode_cursor(last.created_at, last.id)}"
    return {"previous": None, "next": next_url, "results": [render(services, j) for j in page]}


@router.get("/webhooks/default/secret")
async def webhook_secret(services: ServicesDep, owner: OwnerDep) -> dict[str, str]:
    return {"key": owner_secret(services.secret, owner)}


@router.get("/predictions/{job_id}/stream")
async def stream_prediction(
    job_id: str, request: Request, services: ServicesDep, expires: int = 0, sig: str = ""
) -> StreamingResponse:
    """SSE as Replicate sends it: `output` per file URL, `logs` lines as steps finish, then `error` and/or
    `done`, each with an `id:` (replicate-python drops events without one). Opened with the signed URL
    from ``urls.stream``, or with a token."""
    if sig:
        good = _stream_signature(services.secret, job_id, expires).encode()
        if expires < time.time() or not hmac.compare_digest(good, sig.encode("utf-8", "surrogateescape")):
            raise Forbidden("This stream URL is invalid or has expired; fetch the prediction again for a fresh one.")
        found = await services.jobs.find(job_id)
        if found is None or found.dialect != "replicate":
            raise NotFound(f"No job with id {job_id!r}.", param="id")
        owner = found.owner
    else:
        owner = await require_owner(request)
    await _replicate_job(services, job_id, owner)

    async def events() -> AsyncIterator[bytes]:
        sent_logs = 0
        ids = iter(range(1, 1 << 62))
        async for job in services.jobs.watch(job_id, owner):
            lines = job.log_lines()
            for line in lines[sent_logs:]:
                yield sse_frame("logs", line, next(ids))
            sent_logs = len(lines)
            if job.status is Status.SUCCEEDED:
                for url in services.output_urls(job):
                    yield sse_frame("output", url, next(ids))
            if job.status in (Status.FAILED, Status.ABORTED):
                yield sse_frame("error", json.dumps({"detail": job.error}), next(ids))
            if job.status.is_terminal:
                reason = {Status.CANCELED: "canceled", Status.ABORTED: "aborted", Status.FAILED: "error"}
                done = {"reason": reason[job.status]} if job.status in reason else {}
                yield sse_frame("done", json.dumps(done), next(ids))

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# Replicate's paths: every error under them, a 404 or 405 of a route not served here too, is a problem detail.
_PREFIXES = (
    "/v1/predictions",
    "/v1/files",
    "/v1/webhooks",
    "/v1/deployments",
    "/v1/trainings",
    "/v1/collections",
    "/v1/hardware",
    "/v1/account",
)


def _owns(path: str) -> bool:
    # /v1/models/{owner}/{name}...; /v1/models and /v1/models/{id} are OpenAI's.
    return path.startswith(_PREFIXES) or (path.startswith("/v1/models/") and path.count("/") >= 4)


def _body_limit(path: str) -> int:
    if path == "/v1/files":
        return UPLOAD_BODY_BYTES
    creates = path.startswith("/v1/predictions") or path.endswith("/predictions")
    return IMAGE_JSON_BODY_BYTES if creates else JSON_BODY_BYTES


DIALECT = Dialect(
    "replicate",
    (router, replicate_files.router),
    _owns,
    render_replicate,
    render,
    webhook_rules=WEBHOOKS,
    body_limit=_body_limit,
    prefix="/replicate",
)
