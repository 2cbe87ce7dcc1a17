"""OpenAI Images responses of a job: the synchronous images body (url or b64_json) and the SSE stream."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.safety import FLAGGED_CODE
from ..errors import ClientDisconnected
from ..job import Job, Status
from ..spec import GenerationSpec
from ..storage import LocalStorage
from .deps import Services, idempotency_key
from .errors import job_failure
from .inputs import Inputs, submit
from .sse import sse_frame


def stream_response(
    request: Request, services: Services, job: Job, owner: str, quality: str | None, kind: str
) -> StreamingResponse:
    """``kind``: image_generation or image_edit, the prefix of the events' types."""
    cancel = idempotency_key(request) is None
    return StreamingResponse(
        stream_events(services, job, owner, quality or "auto", kind=kind, cancel_on_disconnect=cancel),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def stream_events(
    services: Services, job: Job, owner: str, quality: str, *, kind: str, cancel_on_disconnect: bool
) -> AsyncIterator[bytes]:
    """OpenAI image streaming: partial_image events with previews, then completed (always b64_json).

    A client that goes away mid-stream cancels its job, as the synchronous call does (unless the job is
    shared through an Idempotency-Key). The server cancels this generator then, so nothing here may await.
    """
    ended = False
    try:
        async for chunk in _stream_job(services, job, owner, quality, kind):
            yield chunk
        ended = True
    finally:
        if not ended and cancel_on_disconnect:
            services.jobs.cancel_soon(job.id, owner)


async def _stream_job(services: Services, job: Job, owner: str, quality: str, kind: str) -> AsyncIterator[bytes]:
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
            event = {"type": f"{kind}.partial_image", "partial_image_index": index}
            yield _sse(event | common, await services.jobs.run_slow(services.storage.read, key))
        sent = len(current.previews)
        if current.status is Status.SUCCEEDED:
            for out in current.outputs:
                usage = {
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "total_tokens": 0,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                }
                event = {"type": f"{kind}.completed", "usage": usage}
                yield _sse(event | common, await services.jobs.run_slow(services.storage.read, out.key))
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
    return sse_frame(str(event["type"]), images.dumps(event))


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
    """The synchronous OpenAI call: a job like any other, waited on, rendered as an images response.
    In async mode (``"async": true`` or ``Prefer: respond-async``): 202 and the task, not waited on."""
    key = idempotency_key(request)
    job = await submit(services, request, owner, "openai", spec, echo, inputs)
    if echo.get("async") or echo.get("async_") or "respond-async" in request.headers.get("prefer", "").lower():
        return JSONResponse(task_body(services, job), status_code=202)
    while not job.status.is_terminal:
        job = await services.jobs.wait(job.id, owner, timeout=1.0, seen=job)
        # A client that gave up (a closed chat tab, a timeout) frees the GPU. A job shared through an
        # Idempotency-Key may have another waiter (a retry replays it), so it runs on, but this request
        # stops waiting for it all the same.
        if not job.status.is_terminal and await request.is_disconnected():
            if key is None:
                await services.jobs.cancel(job.id, owner)
            raise ClientDisconnected("The client closed the connection before the images were ready.")
    if job.status is not Status.SUCCEEDED:
        raise job_failure(job)
    body = {
        "created": int(job.created_at),
        "data": [],
        "background": "opaque",
        "output_format": spec.output_format,
        "quality": quality or "auto",
        "size": "{}x{}".format(*job.size),
    }
    response_format = response_format or "url"
    if response_format == "url" or (isinstance(services.storage, LocalStorage) and _small(job)):
        return _images_response(services, job, body, response_format)  # less work than a thread's hand-off
    # Reading (an object store: a network call) and base64-encoding larger images is work for a thread, not
    # the event loop.
    return await services.jobs.run_slow(_images_response, services, job, body, response_format)


# Up to this many pixels in all, images on the local disk are read and base64-encoded on the event loop, sparing
# a thread hand-off per synchronous call (the relay hop, bench/api_edge.py). Measured here: a 256x256 PNG of
# pure noise (197 KB, the worst case for its size) in 0.22 ms, a 512x512 one (788 KB) in 0.94 ms: the limit
# keeps the loop's pause well under a millisecond.
INLINE_PIXELS = 2 * 256 * 256


def _small(job: Job) -> bool:
    return sum(o.width * o.height for o in job.outputs) <= INLINE_PIXELS


_TASK_STATUS = {
    Status.QUEUED: "queued",
    Status.PROCESSING: "in_progress",
    Status.SUCCEEDED: "completed",
    Status.FAILED: "failed",
    Status.CANCELED: "canceled",
    Status.ABORTED: "canceled",
}


def task_body(services: Services, job: Job) -> dict[str, Any]:
    """An async images task: its id (as ``id`` and ``task_id``), status, progress, then the images response's
    ``data`` (URLs: a task is fetched, its images are not inlined) or OpenAI's error object."""
    body: dict[str, Any] = {
        "id": job.id,
        "task_id": job.id,
        "object": "image.generation.task",
        "model": job.spec.model,
        "status": _TASK_STATUS[job.status],
        "progress": round(job.progress * 100),
        "created": int(job.created_at),
        "completed_at": int(job.completed_at) if job.completed_at else None,
        "data": None,
        "error": None,
    }
    if job.status is Status.SUCCEEDED:
        body["data"] = [
            {"url": services.storage.url(o.key), "revised_prompt": o.prompt or job.spec.prompt, "seed": o.seed}
            for o in job.outputs
        ]
        body["size"] = "{}x{}".format(*job.size)
        body["output_format"] = job.spec.output_format
    elif job.status.is_terminal:
        code = job.error_code or ("canceled" if job.status is not Status.FAILED else "generation_failed")
        code = "moderation_blocked" if code == FLAGGED_CODE else code
        body["error"] = {"message": job.error or job.status.value, "code": code}
    return body


def _images_response(services: Services, job: Job, body: dict[str, Any], response_format: str) -> Response:
    images = _Base64Images()
    for out in job.outputs:
        item: dict[str, Any] = {"revised_prompt": out.prompt or job.spec.prompt, "seed": out.seed}
        if response_format == "b64_json":
            item["b64_json"] = images.add(services.storage.read(out.key))
        else:
            item["url"] = services.storage.url(out.key)
        body["data"].append(item)
    return Response(images.dumps(body), media_type="application/json")
