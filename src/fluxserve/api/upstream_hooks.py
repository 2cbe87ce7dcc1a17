"""POST /v1/upstream-hooks/{upstream}/{task}: a provider's webhook for a task fluxserve submitted (BFL's, given
at submit when --public-url is set). No API key: the signature, with the secret derived for that task, is the
proof. A valid one wakes the worker polling the task, which reads the result at once; anything else is a 401."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ..errors import Unauthorized
from ..upstream.hooks import HOOK_PATH, hook_secret, job_of, signed_by
from .deps import ServicesDep

router = APIRouter(prefix=HOOK_PATH)
MAX_HOOK_BYTES = 1024 * 1024


@router.post("/{upstream}/{ref}", include_in_schema=False)
async def upstream_hook(upstream: str, ref: str, request: Request, services: ServicesDep) -> dict[str, Any]:
    config = services.registry.upstreams.get(upstream)
    body = await request.body()
    secret = hook_secret(services.secret, upstream, ref)
    if (
        config is None
        or len(body) > MAX_HOOK_BYTES
        or not signed_by(secret, body, request.headers.get("x-bfl-signature"))
    ):
        raise Unauthorized("The webhook's signature does not match.", code="invalid_signature")
    services.jobs.wake(job_of(ref))
    return {"ok": True}
