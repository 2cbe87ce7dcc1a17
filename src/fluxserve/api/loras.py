"""GET /v1/loras: the adapters in the operator's LoRA folder, by the name requests use."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..loras import MAX_ADAPTERS, MAX_SCALE, MIN_SCALE
from .deps import OwnerDep, ServicesDep

router = APIRouter(prefix="/v1")


@router.get("/loras")
async def list_loras(services: ServicesDep, _owner: OwnerDep) -> dict[str, Any]:
    # Reads every file's header: off the event loop.
    adapters = await services.jobs.run(services.loras.available)
    return {
        "object": "list",
        "data": adapters,
        "limits": {"max_per_request": MAX_ADAPTERS, "min_scale": MIN_SCALE, "max_scale": MAX_SCALE},
        "sources": ["a name from this list", "a hub id (owner/repo)", "an https URL of a .safetensors file"],
    }
