"""Serves output files behind signed, expiring URLs (the local storage backend)."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import Forbidden, Gone, NotFound
from ..storage import LocalStorage, valid_key
from .deps import ServicesDep

router = APIRouter()


@router.get("/files/{key:path}")
async def get_file(key: str, services: ServicesDep, expires: int = 0, sig: str = "") -> FileResponse:
    storage = services.storage
    if not valid_key(key) or not isinstance(storage, LocalStorage):  # object stores hand out their own URLs
        raise NotFound("No such file.", param="key")
    if not storage.verify(key, expires, sig):
        raise Forbidden("This file URL is invalid or has expired; fetch the job again for a fresh URL.")
    path = storage.open(key)
    if not path.is_file():
        job = await services.jobs.find(key.split("/", 1)[0])
        if job is not None and job.files_expired_at is not None:
            raise Gone(
                f"This file was deleted after the server's retention period ({services.settings.retention}); "
                "the job's record remains."
            )
        raise NotFound("No such file.", param="key")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})
