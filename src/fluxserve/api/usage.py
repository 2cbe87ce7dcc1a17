"""GET /v1/usage: the calling key's own usage per model and UTC day."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..errors import InvalidInput
from ..usage import parse_since, usage
from .deps import OwnerDep, ServicesDep

router = APIRouter(prefix="/v1")


@router.get("/usage")
async def own_usage(
    services: ServicesDep, owner: OwnerDep, since: str | None = None, by: str | None = None
) -> dict[str, Any]:
    """The key's usage per model and day; ``by=end_user`` splits it by each request's safety_identifier
    (or user), as an app with many users of one key needs."""
    start = parse_since(since)
    if by not in (None, "end_user"):
        raise InvalidInput(f"by must be end_user (or left out); got {by!r}.", param="by")
    rows = await services.jobs.run(usage, services.store, start, owner, by_end_user=by == "end_user")
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
