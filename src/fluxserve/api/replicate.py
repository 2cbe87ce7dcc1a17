"""Replicate's predictions API over the job core: create, get, list, cancel, wait, stream."""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidInput, NotFound
from ..job import EventKind, Job, Status
from ..loras import LoraRequest
from ..spec import ASPECT_RATIOS, fit_megapixel
from ..store import WebhookRules
from ..webhooks import check_webhook_url, owner_secret
from .deps import OwnerDep, Services, ServicesDep
from .errors import json_body, read_json
from .inputs import Inputs, elide_inline_images, image_and_size, resolve_loras, submit

router = APIRouter(prefix="/v1")

AspectRatio = Literal["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
assert set(AspectRatio.__args__) == set(ASPECT_RATIOS)  # type: ignore[attr-defined]
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


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    seed: int | None = None


# Field names and wire formats are Replicate's; defaults and ranges of steps, guidance and sizes are the
# model's (ModelSpec.make_spec checks them), so an operator's TOML reaches this dialect too.
class SchnellInput(_Input):
    aspect_ratio: AspectRatio = "1:1"
    num_outputs: int = Field(default=1, ge=1, le=4)
    num_inference_steps: int | None = None
    output_format: Literal["webp", "jpg", "png"] = "webp"
    output_quality: int = Field(default=80, ge=0, le=100)
    disable_safety_checker: bool = False
    go_fast: bool = True  # accepted; fluxserve's default mode is already the exact one
    megapixels: Literal["1", "0.25"] = "1"


class DevInput(SchnellInput):
    guidance: float | None = None
    image: str | None = None
    prompt_strength: float = Field(default=0.8, ge=0, le=1)


class Pro11Input(_Input):
    aspect_ratio: AspectRatio | Literal["custom"] = "1:1"
    width: int | None = None
    height: int | None = None
    safety_tolerance: int = Field(default=2, ge=1, le=6)
    prompt_upsampling: bool = False
    output_format: Literal["webp", "jpg", "png"] = "webp"
    output_quality: int = Field(default=80, ge=0, le=100)
    image_prompt: str | None = None  # Redux: refused with a clear message in _spec


class ProInput(Pro11Input):
    steps: int | None = None
    guidance: float | None = None
    interval: float = Field(default=2, ge=1, le=4)


class _LoraFields(BaseModel):
    """Replicate's LoRA fields (flux-dev-lora, flux-schnell-lora): an adapter and an optional second one."""

    lora_weights: str | None = None
    lora_scale: float = 1.0
    extra_lora: str | None = None
    extra_lora_scale: float = 1.0

    def lora_requests(self) -> list[LoraRequest]:
        pairs = [("lora_weights", "lora_scale"), ("extra_lora", "extra_lora_scale")]
        return [
            LoraRequest(getattr(self, w), getattr(self, sc), f"input.{w}", f"input.{sc}")
            for w, sc in pairs
            if getattr(self, w) is not None
        ]


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


Flux2Aspect = AspectRatio | Literal["match_input_image", "custom"]


class Flux2Input(_Input, _LoraFields):
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


class Flux2FlexInput(Flux2Input):
    """flux-2-flex: the FLUX.2 whose steps and guidance clients set."""

    steps: int | None = None
    guidance: float | None = None
    prompt_upsampling: bool = True  # accepted; there is no prompt upsampler here


class KleinInput(_Input, _LoraFields):
    """black-forest-labs/flux-2-klein-*: references in ``images``, an array of output URIs."""

    images: list[str] = Field(default_factory=list)
    aspect_ratio: AspectRatio | Literal["match_input_image"] = "1:1"
    output_megapixels: Literal["0.25", "0.5", "1", "2", "4"] = "1"
    output_format: Literal["webp", "jpg", "png"] = "jpg"
    output_quality: int = Field(default=95, ge=0, le=100)
    go_fast: bool = False
    disable_safety_checker: bool = False


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
}
_FORMATS = {"jpg": "jpeg", "png": "png", "webp": "webp"}


class ModelPredictionRequest(BaseModel):
    """The body of /v1/models/{owner}/{name}/predictions as documented (the input is per model)."""

    input: dict[str, Any]
    webhook: str | None = None
    webhook_events_filter: list[Literal["start", "output", "logs", "completed"]] | None = None


class PredictionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: str | None = None
    input: dict[str, Any]
    webhook: str | None = None
    webhook_events_filter: list[Literal["start", "output", "logs", "completed"]] | None = None
    stream: bool | None = None  # deprecated by Replicate; every prediction has urls.stream


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
        "status": job.status.public,
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
            "stream": f"{base}/v1/predictions/{job.id}/stream",
        },
    }


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


MAX_DURATION_S = 7 * 24 * 3600  # a deadline beyond a week means nothing to a queue; huge ones overflow dates


def parse_duration(value: str, *, param: str) -> float:
    """Go-style durations as Replicate takes them: '30s', '5m', '1h30m', '1.5s', '500ms'."""
    text = value.strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise InvalidInput(f"{param} must be a duration such as '30s', '5m' or '1h30m'; got {value!r}.", param=param)
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
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
        if not value.strip().isdigit() or not 1 <= int(value) <= 60:
            raise InvalidInput(
                f"Prefer: wait={value} is invalid; use wait or wait=N with N from 1 to 60.", param="Prefer"
            )
        return float(value)
    return None


async def _create(request: Request, services: Services, owner: str, name: str, body: PredictionRequest) -> Any:
    if name not in MODELS or MODELS[name][0] not in services.registry:
        raise NotFound(
            f"Model {OWNER}/{name} is not served here; available: "
            + ", ".join(f"{OWNER}/{m}" for m, (n, _, _) in MODELS.items() if n in services.registry),
            param="model",
        )
    model_name, schema, list_output = MODELS[name]
    model = services.registry.get(model_name)
    from pydantic import ValidationError

    from .errors import from_validation_errors

    try:
        inp = schema.model_validate(body.input)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors()), prefix="input.") from exc
    spec, inputs = await _spec(services, model, inp)
    wait_s = parse_prefer_wait(request.headers.get("prefer"))
    cancel_after = request.headers.get("cancel-after")
    deadline = time.time() + parse_duration(cancel_after, param="Cancel-After") if cancel_after else None
    webhook = None
    if body.webhook:
        await services.jobs.run(
            check_webhook_url, body.webhook, param="webhook", allow_private=services.settings.allow_private_urls
        )
        events: list[str] = list(body.webhook_events_filter) if body.webhook_events_filter else list(WEBHOOKS.names)
        webhook = {"url": body.webhook, "events": events}
    echo = {"model": f"{OWNER}/{name}", "input": elide_inline_images(body.input), "list_output": list_output}
    job = await submit(services, request, owner, "replicate", spec, echo, inputs, deadline=deadline, webhook=webhook)
    if wait_s is not None:
        job = await services.jobs.wait(job.id, owner, timeout=wait_s)
    else:
        job = await services.jobs.get(job.id, owner)
    return JSONResponse(render(services, job), status_code=201)


def _refs_field(inp: Flux2Input | KleinInput) -> str:
    return "images" if isinstance(inp, KleinInput) else "input_images"


async def _flux2_inputs(services: Services, model: Any, inp: Flux2Input | KleinInput) -> tuple[Inputs, int, int]:
    """FLUX.2's sizes: an aspect ratio at a resolution, the first reference's, or custom width/height."""
    refs = inp.images if isinstance(inp, KleinInput) else inp.input_images
    values = [(f"input.{_refs_field(inp)}[{i}]", v) for i, v in enumerate(refs)]
    megapixels: str = "1"
    if isinstance(inp, KleinInput):
        megapixels = inp.output_megapixels
    elif inp.resolution != "match_input_image":
        megapixels = inp.resolution.split()[0]
    if inp.aspect_ratio == "custom":
        assert isinstance(inp, Flux2Input)
        if inp.width is None or inp.height is None:
            raise InvalidInput("aspect_ratio 'custom' needs input.width and input.height.", param="input.width")
        inputs, _, _ = await image_and_size(services, model, values, aspect_ratio="1:1", aspect_explicit=True)
        return inputs, inp.width, inp.height
    inputs, width, height = await image_and_size(
        services,
        model,
        values,
        aspect_ratio=inp.aspect_ratio,
        aspect_explicit=True,
        megapixels=megapixels,
        aspect_param="input.aspect_ratio",
    )
    if isinstance(inp, Flux2Input) and inp.resolution == "match_input_image" and inputs.images:
        width, height = fit_megapixel(*inputs.images[0].size, target=inputs.images[0].width * inputs.images[0].height)
    return inputs, width, height


async def _spec(services: Services, model: Any, inp: _Input) -> tuple[Any, Inputs]:
    requests = inp.lora_requests() if isinstance(inp, _LoraFields) else []
    loras = await resolve_loras(services, model, requests, param="input.lora_weights")
    if isinstance(inp, Flux2Input | KleinInput):
        inputs, width, height = await _flux2_inputs(services, model, inp)
        spec = model.make_spec(
            prompt=inp.prompt,
            width=width,
            height=height,
            num_images=1,
            steps=getattr(inp, "steps", None),
            guidance=getattr(inp, "guidance", None),
            seed=inp.seed,
            output_format=_FORMATS[inp.output_format],
            quality=max(1, inp.output_quality),
            images=inputs.keys,
            loras=loras,
            params={
                "prompt": "input.prompt",
                "steps": "input.steps",
                "guidance": "input.guidance",
                "seed": "input.seed",
                "size": "input.width",
                "image": f"input.{_refs_field(inp)}",
            },
        )
        return spec, inputs
    values: list[tuple[str, str]] = []
    if isinstance(inp, DevInput) and inp.image:
        values = [("input.image", inp.image)]
    if isinstance(inp, KontextInput) and inp.input_image:
        values = [("input.input_image", inp.input_image)]
        if inp.safety_tolerance > 2:
            raise InvalidInput(
                "input.safety_tolerance can be at most 2 with an input image.", param="input.safety_tolerance"
            )
    if isinstance(inp, Pro11Input) and inp.image_prompt:
        raise InvalidInput("input.image_prompt (Redux) is not supported by this server.", param="input.image_prompt")
    aspect = getattr(inp, "aspect_ratio", "1:1")
    if isinstance(inp, Pro11Input) and aspect == "custom":
        if inp.width is None or inp.height is None:
            raise InvalidInput("aspect_ratio 'custom' needs input.width and input.height.", param="input.width")
        inputs, width, height = Inputs([]), inp.width, inp.height
    else:
        if aspect == "match_input_image" and not values:
            aspect = "1:1"  # Kontext without an input image generates from text
        inputs, width, height = await image_and_size(
            services,
            model,
            values,
            aspect_ratio=aspect,
            aspect_explicit="aspect_ratio" in inp.model_fields_set,
            megapixels=getattr(inp, "megapixels", "1"),
            aspect_param="input.aspect_ratio",
        )
    steps = getattr(inp, "num_inference_steps", None) or getattr(inp, "steps", None)
    spec = model.make_spec(
        prompt=inp.prompt,
        width=width,
        height=height,
        num_images=getattr(inp, "num_outputs", 1),
        steps=steps if steps is not None else None,
        guidance=getattr(inp, "guidance", None),
        seed=inp.seed,
        output_format=_FORMATS[getattr(inp, "output_format", "png")],
        quality=max(1, getattr(inp, "output_quality", 100)),
        images=inputs.keys,
        strength=getattr(inp, "prompt_strength", None) if values else None,
        loras=loras,
        params={
            "prompt": "input.prompt",
            "steps": "input.num_inference_steps",
            "guidance": "input.guidance",
            "seed": "input.seed",
            "size": "input.width",
            "strength": "input.prompt_strength",
        },
    )
    return spec, inputs


@router.post("/models/{owner_name}/{name}/predictions", openapi_extra=json_body(ModelPredictionRequest))
async def create_model_prediction(
    owner_name: str, name: str, request: Request, services: ServicesDep, owner: OwnerDep
) -> Any:
    body = await read_json(request, PredictionRequest)
    if owner_name != OWNER:
        raise NotFound(f"Model {owner_name}/{name} is not served here.", param="model")
    return await _create(request, services, owner, name, body)


@router.post("/predictions", openapi_extra=json_body(PredictionRequest))
async def create_prediction(request: Request, services: ServicesDep, owner: OwnerDep) -> Any:
    body = await read_json(request, PredictionRequest)
    if not body.version:
        raise InvalidInput("Missing required parameter 'version' (owner/name or owner/name:version).", param="version")
    ref = body.version.split(":", 1)[0]
    owner_name, _, name = ref.partition("/")
    if owner_name != OWNER or not name:
        raise InvalidInput(
            f"version {body.version!r} is not a model served here; use {OWNER}/NAME, e.g. {OWNER}/flux-schnell.",
            param="version",
        )
    return await _create(request, services, owner, name, body)


async def _replicate_job(services: Services, job_id: str, owner: str) -> Job:
    return await services.jobs.get(job_id, owner, dialect="replicate")


@router.get("/predictions/{job_id}")
async def get_prediction(job_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    return render(services, await _replicate_job(services, job_id, owner))


@router.post("/predictions/{job_id}/cancel")
async def cancel_prediction(job_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    return render(services, await services.jobs.cancel(job_id, owner, dialect="replicate"))


@router.get("/predictions")
async def list_predictions(services: ServicesDep, owner: OwnerDep, cursor: str | None = None) -> dict[str, Any]:
    before = _decode_cursor(cursor) if cursor else None
    jobs = await services.jobs.list(owner, "replicate", before=before, limit=PAGE_SIZE + 1)
    page, more = jobs[:PAGE_SIZE], len(jobs) > PAGE_SIZE
    next_url = None
    if more:
        last = page[-1]
        token = base64.urlsafe_b64encode(json.dumps([last.created_at, last.id]).encode()).decode()
        next_url = f"{services.settings.base_url}/v1/predictions?cursor={token}"
    return {"previous": None, "next": next_url, "results": [render(services, j) for j in page]}


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if isinstance(created, bool) or not isinstance(created, int | float) or not isinstance(job_id, str):
            raise TypeError("not a (created, id) pair")
        if not math.isfinite(created):
            raise ValueError("created is not finite")
        return float(created), job_id
    except (ValueError, TypeError) as exc:
        raise InvalidInput("cursor is not a cursor this server handed out.", param="cursor") from exc


@router.get("/webhooks/default/secret")
async def webhook_secret(services: ServicesDep, owner: OwnerDep) -> dict[str, str]:
    return {"key": owner_secret(services.secret, owner)}


@router.get("/predictions/{job_id}/stream")
async def stream_prediction(job_id: str, services: ServicesDep, owner: OwnerDep) -> StreamingResponse:
    """SSE: `logs` lines as steps finish, `output` per file URL, then `error` and/or `done`."""
    await _replicate_job(services, job_id, owner)

    async def events() -> AsyncIterator[str]:
        sent_logs = 0
        async for job in services.jobs.watch(job_id, owner):
            lines = job.log_lines()
            for line in lines[sent_logs:]:
                yield _sse("logs", line)
            sent_logs = len(lines)
            if job.status is Status.SUCCEEDED:
                for url in services.output_urls(job):
                    yield _sse("output", url)
            if job.status in (Status.FAILED, Status.ABORTED):
                yield _sse("error", json.dumps({"detail": job.error}))
            if job.status.is_terminal:
                reason = {Status.CANCELED: "canceled", Status.ABORTED: "aborted", Status.FAILED: "error"}
                yield _sse("done", json.dumps({"reason": reason[job.status]} if job.status in reason else {}))

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _sse(event: str, data: str) -> str:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\n{lines}\n"
