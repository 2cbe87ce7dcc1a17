"""GET /v1/usage: the calling key's own usage per model and UTC day."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..usage import parse_since, usage
from .deps import OwnerDep, ServicesDep

router = APIRouter(prefix="/v1")


@router.get("/usage")
async def own_usage(services: ServicesDep, owner: OwnerDep, since: str | None = None) -> dict[str, Any]:
    start = parse_since(since)
    rows = await services.jobs.run(usage, services.store, start, owner)
    credits = await services.jobs.run(services.store.key_credits, owner)
    return {
        "object": "list",
        "since": start,
        "credits": credits,  # the key's balance now; null: not metered
        # Uploads it keeps now (/v1/files), and its quota (0: no limit).
        "files": await services.files.totals(owner)
        | {"max_count": services.files.max_files, "max_bytes": services.files.max_bytes},
        "data": [{k: v for k, v in r.to_dict().items() if k != "key"} for r in rows],
    }
