"""OpenAI's Batch API over images, on the durable queue: each line of the input file is a job at the lowest
priority (an interactive job from any key is never queued behind one), admitted like any create (limits,
credits, usage); a bad line goes to the error file and never fails the batch. The batch moves on as it is
read: once every line has ended, the first reader writes the output and error files."""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import durations
from ..errors import FluxServeError, InvalidInput, NotFound
from ..job import Job, Status
from ..spec import fit_megapixel, parse_size
from ..store import Batch
from .deps import OwnerDep, Services, ServicesDep
from .errors import from_validation_errors, json_body, read_json
from .inputs import Inputs, elide_inline_images, known_fields
from .lean import lean
from .openai_schemas import DEFAULT_MODEL, ImageFields, ImageGenerationRequest, response_format
from .uploads import images_from_values

router = APIRouter(prefix="/v1")
ENDPOINTS = ("/v1/images/generations", "/v1/images/edits")
MAX_LINES = 50_000
MAX_WINDOW_S = 7 * 24 * 3600.0
ACTIVE = ("validating", "in_progress", "cancelling")


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


class EditLine(ImageFields):
    """A JSON edit in a batch: images by URL (or data: URL, or a file of this key), as OpenAI's JSON edits."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    size: str | None = None
    response_format: str | None = None
    image: str | list[str] | None = None
    images: list[str | dict[str, str]] | None = None


def _window(value: str) -> float:
    try:
        seconds = durations.parse_duration(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise InvalidInput(
            f"completion_window must be a duration such as '24h' (OpenAI's only value), at most 168h; got {value!r}.",
            param="completion_window",
        )
    return seconds


@router.post("/batches", openapi_extra=json_body(BatchCreate))
async def create_batch(request: Request, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    body = await read_json(request, BatchCreate)
    if body.endpoint not in ENDPOINTS:
        raise InvalidInput(f"endpoint must be one of {', '.join(ENDPOINTS)}; got {body.endpoint!r}.", param="endpoint")
    window = _window(body.completion_window)
    stored = await services.files.find(owner, body.input_file_id)
    if stored is None or stored.metadata.get("purpose") != "batch":
        raise InvalidInput(
            f"input_file_id {body.input_file_id!r} is not a file uploaded with purpose 'batch' by this key.",
            param="input_file_id",
        )
    lines = [line for line in (await services.files.read(stored)).decode("utf-8", "replace").splitlines() if line]
    if not 0 < len(lines) <= MAX_LINES:
        raise InvalidInput(
            f"The input file must hold 1 to {MAX_LINES} lines; it holds {len(lines)}.", param="input_file_id"
        )
    now = time.time()
    batch = Batch(
        f"batch_{secrets.token_hex(12)}",
        owner,
        body.endpoint,
        body.input_file_id,
        body.completion_window,
        "validating",
        now,
        now + window,
        total=len(lines),
        metadata=dict(body.metadata or {}),
    )
    await services.jobs.run(services.store.add_batch, batch)
    rejected: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, line in enumerate(lines):
        custom_id = None
        try:
            custom_id, payload = _parse(line, body.endpoint, seen)
            await _submit_line(services, owner, batch, n, custom_id, payload)
        except FluxServeError as exc:
            rejected.append({"line": n, "custom_id": custom_id, "code": exc.code, "message": exc.message})
    moved = {"status": "in_progress", "in_progress_at": time.time(), "rejected": rejected}
    await services.jobs.run(services.store.move_batch, batch.id, ("validating",), moved)
    return await _answer(services, owner, batch.id)


def _parse(line: str, endpoint: str, seen: set[str]) -> tuple[str, dict[str, Any]]:
    try:
        item = json.loads(line)
    except ValueError:
        raise InvalidInput("The line is not JSON.", param="line") from None
    if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str) or not item["custom_id"]:
        raise InvalidInput("Each line needs a custom_id (a string).", param="custom_id")
    custom_id: str = item["custom_id"][:64]
    if custom_id in seen:
        raise InvalidInput(f"custom_id {custom_id!r} is used by an earlier line.", param="custom_id")
    seen.add(custom_id)
    if item.get("method", "POST") != "POST" or item.get("url") != endpoint:
        raise InvalidInput(f"Each line must be a POST to the batch's endpoint {endpoint}.", param="url")
    if not isinstance(item.get("body"), dict):
        raise InvalidInput("Each line needs a body (a JSON object).", param="body")
    return custom_id, item["body"]


async def _submit_line(
    services: Services, owner: str, batch: Batch, n: int, custom_id: str, payload: dict[str, Any]
) -> None:
    inputs: Inputs | None = None
    try:
        if batch.endpoint == "/v1/images/generations":
            req: ImageFields = ImageGenerationRequest.model_validate(payload)
            model = services.registry.get(getattr(req, "model", None) or DEFAULT_MODEL)
            spec = await req.to_spec(services, owner, model)  # type: ignore[attr-defined]
        else:
            req = edit = EditLine.model_validate(payload)
            model = services.registry.get(edit.model or "flux-kontext-pro")
            values = [(f"images[{i}]", v) for i, v in enumerate(_edit_images(edit))]
            if not values:
                raise InvalidInput("An edit needs image (a URL) or images.", param="image")
            model.check_image_count(len(values), param="images")
            inputs = Inputs(await images_from_values(values, services, owner))
            size = _edit_size(edit, inputs.images[0].size)
            spec = edit.make_spec(model, *size, (), images=inputs.keys)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors())) from exc
    answer_as = response_format(getattr(req, "response_format", None), getattr(req, "model", None))
    echo = {
        "batch": batch.id,
        "line": n,
        "custom_id": custom_id,
        "response_format": answer_as,
        **elide_inline_images(known_fields(req)),
    }
    digest = await inputs.store(services) if inputs is not None else None
    try:
        await services.jobs.submit(owner, "openai", spec, echo, input_digest=digest, batch_id=batch.id)
    except Exception:
        if inputs is not None:
            await inputs.discard(services)
        raise


def _edit_images(edit: EditLine) -> list[str]:
    single = [edit.image] if isinstance(edit.image, str) else list(edit.image or [])
    listed = [i if isinstance(i, str) else i.get("image_url", "") for i in edit.images or []]
    return [*single, *listed]


def _edit_size(edit: EditLine, first: tuple[int, int]) -> tuple[int, int]:
    return parse_size(edit.size) if edit.size and edit.size != "auto" else fit_megapixel(*first)


async def _answer(services: Services, owner: str, batch_id: str) -> dict[str, Any]:
    """The batch as it is, moved on first: expired past its window, finished once every line has ended."""
    batch = await services.jobs.run(services.store.get_batch, owner, batch_id)
    if batch is None:
        raise NotFound(f"No batch with id {batch_id!r}.", param="batch_id")
    jobs = await services.jobs.run(services.store.batch_jobs, batch.id)
    if batch.status == "in_progress" and time.time() > batch.expires_at:
        moved = {"status": "cancelling", "cancelling_at": time.time(), "expired_at": time.time()}
        if await services.jobs.run(services.store.move_batch, batch.id, ("in_progress",), moved):
            await _cancel_all(services, owner, jobs)
        return await _answer(services, owner, batch_id)
    if batch.status in ("in_progress", "cancelling") and all(j.status.is_terminal for j in jobs):
        finalizing = {"status": "finalizing", "finalizing_at": time.time()}
        won = await services.jobs.run(services.store.move_batch, batch.id, (batch.status,), finalizing)
        if won:
            await _finalize(services, batch, jobs)
        return await _answer(services, owner, batch_id) if won else render(batch, jobs)
    return render(batch, jobs)


async def _cancel_all(services: Services, owner: str, jobs: list[Job]) -> None:
    for job in jobs:
        if not job.status.is_terminal:
            await services.jobs.cancel(job.id, owner)


async def _finalize(services: Services, batch: Batch, jobs: list[Job]) -> None:
    """The output file (each succeeded line's images response) and the error file (refused, failed, canceled
    and expired lines), then the batch's final status."""
    out, errors = [], []
    for job in sorted(jobs, key=lambda j: j.request.get("line", 0)):
        line_id, custom_id = f"batch_req_{job.id}", job.request.get("custom_id")
        if job.status is Status.SUCCEEDED:
            body = await services.jobs.run_slow(_images_body, services, job)
            response = {"status_code": 200, "request_id": job.id, "body": body}
            out.append({"id": line_id, "custom_id": custom_id, "response": response, "error": None})
        elif job.status is Status.FAILED:
            error = {"message": job.error, "type": "server_error", "code": job.error_code or "generation_failed"}
            response = {"status_code": 500, "request_id": job.id, "body": {"error": error}}
            errors.append({"id": line_id, "custom_id": custom_id, "response": response, "error": None})
        else:
            code = "batch_expired" if batch.expired_at else "batch_cancelled"
            error = {"code": code, "message": f"The line did not run: the batch {code.removeprefix('batch_')}."}
            errors.append({"id": line_id, "custom_id": custom_id, "response": None, "error": error})
    for refused in batch.rejected:
        error = {"message": refused["message"], "type": "invalid_request_error", "code": refused["code"]}
        response = {"status_code": 400, "request_id": None, "body": {"error": error}}
        line_id = f"batch_req_line_{refused['line']}"
        errors.append({"id": line_id, "custom_id": refused["custom_id"], "response": response, "error": None})
    files: dict[str, Any] = {}
    for kind, lines in (("output", out), ("error", errors)):
        if lines:
            data = "".join(json.dumps(line) + "\n" for line in lines).encode()
            name = f"{batch.id}_{kind}.jsonl"
            stored = await services.files.add(
                batch.owner, name, "application/jsonl", data, {"purpose": "batch_output"}, quota=False
            )
            files[f"{kind}_file_id"] = stored.id
    now = time.time()
    final = "expired" if batch.expired_at else "cancelled" if batch.cancelling_at else "completed"
    when = {"expired": "expired_at", "cancelled": "cancelled_at", "completed": "completed_at"}[final]
    values = {"status": final, when: now, "completed_at": now if final == "completed" else None, **files}
    await services.jobs.run(services.store.move_batch, batch.id, ("finalizing",), values)


def _images_body(services: Services, job: Job) -> dict[str, Any]:
    as_b64 = job.request.get("response_format") == "b64_json"
    data = []
    for out in job.outputs:
        item: dict[str, Any] = {"revised_prompt": out.prompt or job.spec.prompt, "seed": out.seed}
        if as_b64:
            item["b64_json"] = base64.b64encode(services.storage.read(out.key)).decode()
        else:
            item["url"] = services.storage.url(out.key)
        data.append(item)
    size = "{}x{}".format(*job.size)
    return {"created": int(job.created_at), "data": data, "output_format": job.spec.output_format, "size": size}


def render(batch: Batch, jobs: list[Job]) -> dict[str, Any]:
    failed = sum(1 for j in jobs if j.status.is_terminal and j.status is not Status.SUCCEEDED) + len(batch.rejected)

    def when(t: float | None) -> int | None:
        return int(t) if t is not None else None

    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created_at),
        "in_progress_at": when(batch.in_progress_at),
        "expires_at": int(batch.expires_at),
        "finalizing_at": when(batch.finalizing_at),
        "completed_at": when(batch.completed_at),
        "failed_at": None,
        "expired_at": when(batch.expired_at),
        "cancelling_at": when(batch.cancelling_at),
        "cancelled_at": when(batch.cancelled_at),
        "request_counts": {
            "total": batch.total,
            "completed": sum(1 for j in jobs if j.status is Status.SUCCEEDED),
            "failed": failed,
        },
        "metadata": batch.metadata or None,
    }


@router.get("/batches/{batch_id}")
@lean
async def get_batch(batch_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    return await _answer(services, owner, batch_id)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    batch = await services.jobs.run(services.store.get_batch, owner, batch_id)
    if batch is None:
        raise NotFound(f"No batch with id {batch_id!r}.", param="batch_id")
    moved = {"status": "cancelling", "cancelling_at": time.time()}
    if await services.jobs.run(services.store.move_batch, batch.id, ("validating", "in_progress"), moved):
        await _cancel_all(services, owner, await services.jobs.run(services.store.batch_jobs, batch.id))
    return await _answer(services, owner, batch_id)


@router.get("/batches")
async def list_batches(
    services: ServicesDep, owner: OwnerDep, after: str | None = None, limit: int = 20
) -> dict[str, Any]:
    if not 1 <= limit <= 100:
        raise InvalidInput(f"limit must be between 1 and 100; got {limit}.", param="limit")
    rows = await services.jobs.run(lambda: services.store.list_batches(owner, after=after, limit=limit + 1))
    data = [await _answer(services, owner, b.id) for b in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
    }


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, services: ServicesDep, owner: OwnerDep) -> Response:
    """A file's bytes, as OpenAI's files API answers them (a batch's output and error files, uploads)."""
    found = await services.files.get(owner, file_id)
    return Response(await services.files.read(found), media_type=found.content_type)
