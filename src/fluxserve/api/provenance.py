"""POST /v1/content_provenance_checks: OpenAI's provenance check, for the marks fluxserve puts on its images.

OpenAI answers a ``c2pa`` and a ``synthid`` result; ours are ``c2pa`` (any valid manifest, ours or another's:
issuer, model and time as it records them) and ``watermark`` (fluxserve's invisible mark, which survives the
metadata being stripped), naming the job only to the key that made it."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from ..errors import UnsupportedMediaType
from ..images import MAX_IMAGE_BYTES
from ..provenance.check import Check, check
from .deps import OwnerDep, ServicesDep
from .inputs import read_upload

router = APIRouter(prefix="/v1")


def results(found: Check, job_id: str | None) -> list[dict[str, Any]]:
    c2pa = found.c2pa
    detected = c2pa.state in ("trusted", "valid")
    return [
        {
            "type": "c2pa",
            "outcome": "detected" if detected else "not_detected",
            "validation_state": c2pa.state,
            "issuer": c2pa.issuer,
            "model": c2pa.model,
            "generated_at": c2pa.generated_at,
        },
        {
            "type": "watermark",
            "outcome": "detected" if found.mark is not None else "not_detected",
            "mark": None if found.mark is None else f"{found.mark:012x}",
            "job": job_id,
        },
    ]


@router.post("/content_provenance_checks")
async def create_check(request: Request, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type must be multipart/form-data (a `file` part); got {ctype or 'none'!r}."
        )
    form = await request.form(max_files=1, max_fields=4)
    try:
        data = await read_upload(form.get("file"), param="file", max_bytes=MAX_IMAGE_BYTES)
    finally:
        await form.close()
    async with services.decode_slots:  # a decode holds up to 40 MP: as few at once as the other uploads
        found = await services.jobs.run_slow(check, data)
    services.provenance.count("check", "detected" if found.marked else "not_detected")
    mark = found.job_mark
    job = None if mark is None else await services.jobs.run(services.store.find_by_mark, owner, f"{mark:012x}")
    return {
        "object": "content_provenance_check",
        "created_at": int(time.time()),
        "results": results(found, job.id if job is not None else None),
    }
