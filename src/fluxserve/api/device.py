"""Sharing the GPU with another server, by vLLM's names: POST /sleep moves every pipeline off this process's
devices (jobs keep being accepted and wait in the queue), POST /wake_up brings the preloaded names back,
GET /is_sleeping answers {"is_sleeping": bool}. Admin keys only: FLUXSERVE_API_KEY and keys made with
`fluxserve keys create --admin`; any other key gets 403."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from ..errors import Forbidden
from .deps import ServicesDep, get_services, require_owner

router = APIRouter()


async def require_admin(request: Request) -> str:
    owner = await require_owner(request)
    services = get_services(request)
    if not await services.jobs.run_auth(services.auth.is_admin, owner):
        raise Forbidden(
            "This key may not put the engine to sleep or wake it: use FLUXSERVE_API_KEY or a key made with "
            "`fluxserve keys create --admin`.",
            code="admin_key_required",
        )
    return owner


AdminDep = Annotated[str, Depends(require_admin)]


def _sleeping(services: Any) -> bool:
    workers = services.dispatcher.local_workers()
    return any(w.sleeping for w in workers)


async def _on_every_worker(services: Any, step: str) -> dict[str, bool]:
    """``sleep`` or ``wake_up`` on each of this process's workers, off the event loop (a sleep waits for a
    running job to end)."""

    def run() -> None:
        for worker in services.dispatcher.local_workers():
            getattr(worker, step)()

    await services.jobs.run_slow(run)
    return {"is_sleeping": _sleeping(services)}


@router.post("/sleep")
async def sleep(services: ServicesDep, _admin: AdminDep) -> dict[str, bool]:
    return await _on_every_worker(services, "sleep")


@router.post("/wake_up")
async def wake_up(services: ServicesDep, _admin: AdminDep) -> dict[str, bool]:
    awake = await _on_every_worker(services, "wake_up")
    services.dispatcher.wake()  # queued jobs start now, not at the next look
    return awake


@router.get("/is_sleeping")
async def is_sleeping(services: ServicesDep, _admin: AdminDep) -> dict[str, bool]:
    return {"is_sleeping": _sleeping(services)}
