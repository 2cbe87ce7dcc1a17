"""The OpenAI Images dialect: /v1/images/generations and /v1/models."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ClientDisconnected, GenerationFailed
from ..job import Job, Status
from ..models import ModelSpec
from ..spec import Adapter, GenerationSpec, parse_size
from .deps import OwnerDep, Services, ServicesDep, idempotency_key
from .errors import json_body, read_json
from .inputs import Inputs, LoraItem, lora_items, resolve_loras, submit

router = APIRouter(prefix="/v1")

DEFAULT_MODEL = "flux"


def known_fields(body: BaseModel) -> dict[str, Any]:
    """What a job row keeps of a request: the fields this server reads, and only the names of the
    unknown ones it ignored (their values could be megabytes)."""
    extra = body.model_extra or {}
    echo = body.model_dump(exclude_none=True, exclude=set(extra))
    if extra:
        echo["ignored_fields"] = sorted(name[:64] for name in extra)[:20]
    return echo


class ImageFields(BaseModel):
    """What generations and edits both take, and the spec they make of it."""

    prompt: str
    n: int | None = Field(default=None, ge=1, le=10)
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    # fluxserve extensions
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None

    def make_spec(
        self, model: ModelSpec, width: int, height: int, loras: tuple[Adapter, ...], **extra: Any
    ) -> GenerationSpec:
        return model.make_spec(
            prompt=self.prompt,
            width=width,
            height=height,
            num_images=self.n or 1,
            steps=self.steps,
            guidance=self.guidance,
            seed=self.seed,
            output_format=self.output_format or "png",
            quality=max(1, self.output_compression if self.output_compression is not None else 100),
            loras=loras,
            **extra,
        )


class ImageGenerationRequest(ImageFields):
    # Unknown GPT-image fields are accepted and ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["low", "auto"] | None = None
    user: str | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    # fluxserve extensions
    loras: list[LoraItem] | None = None  # LoRA adapters for this request: [{"path", "scale"}]

    async def to_spec(self, services: Services, model: ModelSpec) -> GenerationSpec:
        width, height = parse_size(self.size)
        loras = await resolve_loras(services, model, lora_items(self.loras), param="loras")
        return self.make_spec(model, width, height, loras)


@router.post("/images/generations", openapi_extra=json_body(ImageGenerationRequest))
async def create_image(request: Request, services: ServicesDep, owner: OwnerDep) -> Any:
    body = await read_json(request, ImageGenerationRequest)
    model = services.registry.get(body.model or DEFAULT_MODEL)
    spec = await body.to_spec(services, model)
    echo = known_fields(body)
    if body.stream:
        spec = replace(spec, partial_images=body.partial_images or 0)
        job = await submit(services, request, owner, "openai", spec, echo)
        return StreamingResponse(
            _stream_events(
                services, job, owner, body.quality or "auto", cancel_on_disconnect=idempotency_key(request) is None
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
    return await run_and_render(request, services, owner, spec, echo, body.response_format, body.quality)


async def _stream_events(
    services: Services, job: Job, owner: str, quality: str, *, cancel_on_disconnect: bool
) -> AsyncIterator[bytes]:
    """OpenAI image streaming: partial_image events with previews, then completed (always b64_json).

    A client that goes away mid-stream cancels its job, as the synchronous call does (unless the job is
    shared through an Idempotency-Key). The server cancels this generator then, so nothing here may await.
    """
    ended = False
    try:
        async for chunk in _stream_job(services, job, owner, quality):
            yield chunk
        ended = True
    finally:
        if not ended and cancel_on_disconnect:
            services.jobs.cancel_soon(job.id, owner)


async def _stream_job(services: Services, job: Job, owner: str, quality: str) -> AsyncIterator[bytes]:
    spec = job.spec
    common = {
        "background": "opaque",
        "output_format": spec.output_format,
        "quality": quality,
        "size": f"{spec.width}x{spec.height}",
        "created_at": int(job.created_at),
    }
    sent = 0
    async for current in services.jobs.watch(job.id, owner):
        for index, key in enumerate(current.previews[sent:], start=sent):
            event = {"type": "image_generation.partial_image", "partial_image_index": index}
            yield _sse(event | common, await services.jobs.run(services.storage.read, key))
        sent = len(current.previews)
        if current.status is Status.SUCCEEDED:
            for out in current.outputs:
                usage = {
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "total_tokens": 0,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                }
                event = {"type": "image_generation.completed", "usage": usage}
                yield _sse(event | common, await services.jobs.run(services.storage.read, out.key))
        elif current.status.is_terminal:
            message = current.error or f"The image generation ended as {current.status.value}."
            yield _sse(
                {"type": "error", "error": {"message": message, "type": "server_error", "code": "generation_failed"}}
            )


def _sse(event: dict[str, Any], image: bytes | None = None) -> bytes:
    """One event; ``image`` becomes its b64_json."""
    images = _Base64Images()
    if image is not None:
        event = {"b64_json": images.add(image)} | event
    return f"event: {event['type']}\ndata: ".encode() + images.dumps(event) + b"\n\n"


class _Base64Images:
    """JSON with base64 images spliced in as bytes.

    A 1024x1024 PNG is 4.8 MB of base64; passing it through json.dumps costs tens of ms (it scans the
    string for characters to escape, and base64 has none), more than the rest of the request. ``add``
    returns a placeholder to put in the body, with an unguessable marker no prompt can contain.
    """

    def __init__(self) -> None:
        self._marker = secrets.token_hex(16)
        self._images: list[bytes] = []

    def add(self, image: bytes) -> str:
        self._images.append(image)
        return f"{self._marker}-{len(self._images) - 1}"

    def dumps(self, body: Any) -> bytes:
        out = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        for i, image in enumerate(self._images):
            out = out.replace(f'"{self._marker}-{i}"'.encode(), b'"' + base64.b64encode(image) + b'"', 1)
        return out


async def run_and_render(
    request: Request,
    services: Services,
    owner: str,
    spec: GenerationSpec,
    echo: dict[str, Any],
    response_format: str | None,
    quality: str | None,
    inputs: Inputs | None = None,
) -> Response:
    """The synchronous OpenAI call: a job like any other, waited on, rendered as an images response."""
    key = idempotency_key(request)
    job = await submit(services, request, owner, "openai", spec, echo, inputs)
    while not job.status.is_terminal:
        job = await services.jobs.wait(job.id, owner, timeout=1.0)
        # A client that gave up (a closed chat tab, a timeout) frees the GPU. A job shared through an
        # Idempotency-Key may have another waiter, so it runs on.
        if not job.status.is_terminal and key is None and await request.is_disconnected():
            await services.jobs.cancel(job.id, owner)
            raise ClientDisconnected("The client closed the connection before the images were ready.")
    if job.status is not Status.SUCCEEDED:
        raise GenerationFailed(job.error or f"The image generation ended as {job.status.value}.")
    body = {
        "created": int(job.created_at),
        "data": [],
        "background": "opaque",
        "output_format": spec.output_format,
        "quality": quality or "auto",
        "size": f"{spec.width}x{spec.height}",
    }
    # Reading and base64-encoding the images is work for a thread, not the event loop.
    return await services.jobs.run(_images_response, services, job, body, response_format or "url")


def _images_response(services: Services, job: Job, body: dict[str, Any], response_format: str) -> Response:
    images = _Base64Images()
    for out in job.outputs:
        item: dict[str, Any] = {"revised_prompt": job.spec.prompt, "seed": out.seed}
        if response_format == "b64_json":
            item["b64_json"] = images.add(services.storage.read(out.key))
        else:
            item["url"] = services.storage.url(out.key)
        body["data"].append(item)
    return Response(images.dumps(body), media_type="application/json")


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
                **m.facts(),  # defaults and limits every dialect applies: clients and the playground read them
            }
            for m in services.registry
        ],
    }
