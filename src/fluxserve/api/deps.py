"""What routes reach through request.app.state: the wired services and the caller's identity."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from starlette.datastructures import Headers

from ..auth import Authenticator, bearer_token
from ..errors import InvalidInput
from ..files import FileService
from ..job import Job
from ..jobs import JobService
from ..loras import LoraLibrary
from ..models import ModelRegistry
from ..offload import DNS_DEADLINE_S
from ..provenance import Provenance
from ..queue.base import Dispatcher
from ..settings import Settings
from ..storage import Storage
from ..store import Store
from ..webhooks import check_webhook_url
from .intake import IntakeSlots


@dataclass
class Services:
    settings: Settings
    store: Store
    storage: Storage
    registry: ModelRegistry
    jobs: JobService
    dispatcher: Dispatcher
    auth: Authenticator
    secret: bytes  # the server secret: signs file URLs, derives webhook secrets
    loras: LoraLibrary
    files: FileService  # uploads (Replicate's files API)
    provenance: Provenance = field(default_factory=Provenance.off)  # what marks outputs; its check counts
    # Image decodes at once across requests: each can hold up to 40 MP (160 MB) while it runs.
    decode_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    # Requests gathering input images at once, per node and per key (intake.py).
    intake: IntakeSlots = field(default_factory=IntakeSlots)
    started_at: float = field(default_factory=time.time)

    def output_urls(self, job: Job) -> list[str]:
        return [self.storage.url(o.key) for o in job.outputs]


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def owner_of(services: Services, key: str | None) -> str:
    """The owner of a key, or Unauthorized. The operator's key and stored keys remembered from an earlier
    request need no database read, so no thread hop (one is most of a poll's cost otherwise); other keys are
    looked up off the event loop."""
    owner = services.auth.known_owner(key)
    return owner if owner is not None else await services.jobs.run_auth(services.auth.owner_for, key)


KeyReader = Callable[[Headers], str | None]


class OwnerFrom:
    """A dependency: the owner of the key that ``read_key`` finds in the request's headers (each dialect
    sends its key its own way). A class, not a closure, so the lean read path (api/lean.py) can answer it
    without FastAPI: ``read_key`` on the headers, then ``owner_of``."""

    def __init__(self, read_key: KeyReader) -> None:
        self.read_key = read_key

    async def __call__(self, request: Request) -> str:
        return await owner_of(get_services(request), self.read_key(request.headers))


def bearer_key(headers: Headers) -> str | None:
    return bearer_token(headers.get("authorization"))


def xkey_or_bearer(headers: Headers) -> str | None:
    """BFL clients send the key as x-key; a Bearer header is accepted too."""
    return headers.get("x-key") or bearer_token(headers.get("authorization"))


require_owner = OwnerFrom(bearer_key)
require_owner_xkey = OwnerFrom(xkey_or_bearer)


def idempotency_key(request: Request) -> str | None:
    return request.headers.get("idempotency-key")


async def services_dep(request: Request) -> Services:
    """get_services as a dependency: ``async`` so FastAPI calls it on the loop (a plain ``def`` dependency
    runs on its thread pool: a thread hop on every request)."""
    return get_services(request)


ServicesDep = Annotated[Services, Depends(services_dep)]
OwnerDep = Annotated[str, Depends(require_owner)]
XKeyOwnerDep = Annotated[str, Depends(require_owner_xkey)]


async def check_webhook(services: Services, url: str, *, param: str) -> None:
    """A webhook URL must reach a public host (unless --allow-private-urls): resolved on the DNS threads, and
    a host that does not resolve within their deadline is refused, not waited for."""
    allow = services.settings.allow_private_urls
    try:
        await services.jobs.run_dns(check_webhook_url, url, param=param, allow_private=allow)
    except TimeoutError:
        raise InvalidInput(
            f"{param}: its host did not resolve within {DNS_DEADLINE_S:g} s.", param=param, code="invalid_webhook_url"
        ) from None
