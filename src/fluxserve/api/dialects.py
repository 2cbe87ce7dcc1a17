"""The dialects the app serves: each module's record (api/dialect.py), looped over by create_app."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request

from ..errors import FluxServeError
from ..job import Job
from ..store import WebhookRules
from ..webhooks import owner_secret
from . import a1111, bfl, fal, mcp, openai, replicate, vmodel
from .deps import Services
from .dialect import Dialect

# One line per dialect; the last owns every path no other claims (the playground, files, /health).
DIALECTS: tuple[Dialect, ...] = (
    replicate.DIALECT,
    bfl.DIALECT,
    vmodel.DIALECT,
    a1111.DIALECT,
    fal.DIALECT,
    mcp.DIALECT,
    openai.DIALECT,
)
_BY_NAME = {d.name: d for d in DIALECTS}


def prefixes() -> dict[str, Any]:
    """Each prefixed dialect's prefix and which unprefixed paths it owns (api/prefixes.py)."""
    return {d.prefix: d.owns_path for d in DIALECTS if d.prefix}


def dialect_for_path(path: str) -> Dialect:
    return next(d for d in DIALECTS if d.owns_path(path))


def body_limit_for(path: str) -> int:
    return dialect_for_path(path).body_limit(path)


def render_error(request: Request, exc: FluxServeError) -> JSONResponse:
    return dialect_for_path(request.url.path).render_error(exc)


def render_for_webhook(services: Services, job: Job) -> dict[str, Any] | None:
    """Each dialect's webhook body is its own job rendering."""
    dialect = _BY_NAME.get(job.dialect)
    return dialect.render_webhook(services, job) if dialect and dialect.render_webhook else None


def webhook_rules() -> dict[str, WebhookRules]:
    """For the store's outbox (app.build_core): each dialect's rules, by the Job.dialect it creates."""
    return {d.name: d.webhook_rules for d in DIALECTS if d.webhook_rules is not None}


def webhook_headers_for(job: Job, secret: str, body: bytes) -> dict[str, str]:
    dialect = _BY_NAME.get(job.dialect)
    return dialect.webhook_headers(secret, body) if dialect and dialect.webhook_headers else {}


def webhook_secret_for(services: Services, job: Job) -> str | None:
    dialect = _BY_NAME.get(job.dialect)
    if dialect and dialect.webhook_secret:
        return dialect.webhook_secret(services, job)
    return owner_secret(services.secret, job.owner)
