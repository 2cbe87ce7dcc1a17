"""Replicate's files API: ``POST /v1/files`` (multipart ``content``), list, get, download, delete.

A file belongs to the key that uploaded it; its ``urls.get`` may be named in that key's prediction inputs
(``input_image``, ``image``, ``input_images``: as new-api's Replicate channel and replicate-python send
uploads), where it is read from our storage, never fetched over HTTP. Files are deleted with the rest
after the server's retention period (FLUXSERVE_RETENTION); ``expires_at`` says when.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from ..errors import InvalidInput, UnsupportedMediaType
from ..images import MAX_IMAGE_BYTES
from ..store import StoredFile
from .deps import OwnerDep, Services, ServicesDep
from .inputs import read_upload
from .paging import decode_cursor, encode_cursor

router = APIRouter(prefix="/v1")
PAGE_SIZE = 100
METADATA_BYTES = 8192
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*;[ -~]*)?")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def file_url(services: Services, file_id: str) -> str:
    return f"{services.settings.base_url}/v1/files/{file_id}"


def render(services: Services, f: StoredFile) -> dict[str, Any]:
    retention = services.settings.retention_s
    return {
        "id": f.id,
        "name": f.name,
        "content_type": f.content_type,
        "size": f.size,
        "etag": f.md5,
        "checksums": {"sha256": f.sha256, "md5": f.md5},
        "metadata": f.metadata,
        "created_at": _iso(f.created_at),
        "expires_at": _iso(f.created_at + retention) if retention > 0 else None,
        "urls": {"get": file_url(services, f.id)},
    }


@router.post("/files", status_code=201)
async def create_file(request: Request, services: ServicesDep, owner: OwnerDep) -> Any:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise UnsupportedMediaType(f"Content-Type must be multipart/form-data; got {ctype or 'none'!r}.")
    # replicate-js sends metadata as a second file part (a JSON Blob); replicate-python as a field.
    form = await request.form(max_files=2, max_fields=8)
    if form.get("purpose") is not None:  # OpenAI's files API (file + purpose) shares the path: a batch's input
        try:
            return await _openai_file(services, owner, form.get("purpose"), form.get("file"))
        finally:
            await form.close()
    try:
        content = form.get("content")
        data = await read_upload(content, param="content", max_bytes=MAX_IMAGE_BYTES)
        name = str(form.get("filename") or getattr(content, "filename", None) or "file")[:255]
        mime = str(form.get("type") or getattr(content, "content_type", None) or "application/octet-stream")[:128]
        if not _MEDIA_TYPE.fullmatch(mime):  # it becomes the download's Content-Type header
            raise InvalidInput(f"type must be a media type such as image/png; got {mime!r}.", param="type")
        metadata = await _metadata(form.get("metadata"))
    finally:
        await form.close()
    stored = await services.files.add(owner, name, mime, data, metadata)
    return render(services, stored)


async def _metadata(value: UploadFile | str | None) -> dict[str, Any]:
    """A JSON object of at most 8 KB, sent as a field or as a file part."""
    raw = (await value.read(METADATA_BYTES + 1)).decode("utf-8", "replace") if isinstance(value, UploadFile) else value
    raw = raw or "{}"
    if len(raw) > METADATA_BYTES:
        raise InvalidInput("metadata must be a JSON object of at most 8 KB.", param="metadata")
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested thousands deep
        raise InvalidInput("metadata must be a JSON object.", param="metadata") from exc
    if not isinstance(metadata, dict):
        raise InvalidInput("metadata must be a JSON object.", param="metadata")
    return metadata


@router.get("/files")
async def list_files(services: ServicesDep, owner: OwnerDep, cursor: str | None = None) -> dict[str, Any]:
    before = decode_cursor(cursor) if cursor else None
    rows = await services.files.list(owner, before=before, limit=PAGE_SIZE + 1)
    page = rows[:PAGE_SIZE]
    nxt = None
    if len(rows) > PAGE_SIZE:
        nxt = f"{services.settings.base_url}/v1/files?cursor={encode_cursor(page[-1].created_at, page[-1].id)}"
    return {"previous": None, "next": nxt, "results": [render(services, f) for f in page]}


@router.get("/files/{file_id}")
async def get_file(file_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    return render(services, await services.files.get(owner, file_id))


@router.get("/files/{file_id}/download")
async def download_file(file_id: str, services: ServicesDep, owner: OwnerDep) -> Response:
    found = await services.files.get(owner, file_id)
    data = await services.files.read(found)
    return Response(data, media_type=found.content_type)


@router.delete("/files/{file_id}", status_code=204)
async def delete_file(file_id: str, services: ServicesDep, owner: OwnerDep) -> Response:
    await services.files.delete(owner, file_id)
    return Response(status_code=204)


BATCH_FILE_BYTES = 100 * 1024 * 1024


async def _openai_file(services: Services, owner: str, purpose: object, upload: object) -> JSONResponse:
    """OpenAI's file object ({id, object: "file", bytes, created_at, filename, purpose}) for a batch's input."""
    if purpose != "batch":
        raise InvalidInput(f"purpose must be 'batch' here (image batches); got {str(purpose)[:32]!r}.", param="purpose")
    data = await read_upload(upload, param="file", max_bytes=BATCH_FILE_BYTES)
    name = str(getattr(upload, "filename", None) or "batch.jsonl")[:255]
    stored = await services.files.add(owner, name, "application/jsonl", data, {"purpose": "batch"})
    return JSONResponse(openai_file(stored))


def openai_file(f: StoredFile) -> dict[str, Any]:
    purpose = str(f.metadata.get("purpose", "batch"))
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.size,
        "created_at": int(f.created_at),
        "filename": f.name,
        "purpose": purpose,
        "status": "processed",
    }
