"""The dialects the app serves: one record each, looped over by create_app.

A fifth dialect is its module (router, job rendering) plus one record here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.requests import Request

from ..errors import FluxServeError
from ..job import Job
from ..sealed import unseal
from ..store import WebhookRules
from ..webhooks import owner_secret
from . import bfl, edits, openai, replicate, vmodel
from .bodylimit import IMAGE_JSON_BODY_BYTES, JSON_BODY_BYTES, UPLOAD_BODY_BYTES, json_only
from .deps import Services
from .errors import render_bfl, render_openai, render_replicate

ErrorRenderer = Callable[[FluxServeError], JSONResponse]
JobRenderer = Callable[[Services, Job], dict[str, Any]]


@dataclass(frozen=True)
class Dialect:
    name: str  # Job.dialect of the jobs it creates
    routers: tuple[APIRouter, ...]
    owns_path: Callable[[str], bool]  # errors on these paths come back in this dialect's envelope
    render_error: ErrorRenderer
    render_webhook: JobRenderer | None = None  # None: the dialect sends no webhooks
    # The key its webhooks are signed with; the default is the owner's Standard Webhooks secret.
    webhook_secret: Callable[[Services, Job], str | None] | None = None
    # Which transitions send which webhook events (the job's subscription picks among their names).
    webhook_rules: WebhookRules | None = None
    # The body limit of each of its routes (api/bodylimit.py), by path.
    body_limit: Callable[[str], int] = json_only


def _replicate_path(path: str) -> bool:
    return path.startswith(("/v1/predictions", "/v1/webhooks")) or (
        path.startswith("/v1/models/") and path.rstrip("/").endswith("/predictions")
    )


def _replicate_body(path: str) -> int:
    return (
        IMAGE_JSON_BODY_BYTES
        if path.startswith("/v1/predictions") or path.endswith("/predictions")
        else JSON_BODY_BYTES
    )


def _openai_body(path: str) -> int:
    return UPLOAD_BODY_BYTES if path.startswith(("/v1/images/edits", "/v1/images/variations")) else JSON_BODY_BYTES


def _images_at(prefix: str) -> Callable[[str], int]:
    return lambda path: IMAGE_JSON_BODY_BYTES if path.startswith(prefix) else JSON_BODY_BYTES


def _bfl_secret(services: Services, job: Job) -> str | None:
    """BFL clients send their own secret per request; it is kept sealed in the job row."""
    sealed = (job.webhook or {}).get("secret")
    return unseal(services.secret, sealed) if sealed else None


DIALECTS: tuple[Dialect, ...] = (
    Dialect(
        "replicate",
        (replicate.router,),
        _replicate_path,
        render_replicate,
        replicate.render,
        webhook_rules=replicate.WEBHOOKS,
        body_limit=_replicate_body,
    ),
    Dialect(
        "bfl",
        (bfl.router,),
        lambda path: path.startswith(("/v1/flux-", "/v1/get_result")),
        render_bfl,
        bfl.render_webhook,
        _bfl_secret,
        webhook_rules=bfl.WEBHOOKS,
        body_limit=_images_at("/v1/flux-"),
    ),
    # The seed's relay answers its task API's errors in OpenAI's envelope.
    Dialect(
        "vmodel",
        (vmodel.router,),
        lambda path: path.startswith("/vmodel/"),
        render_openai,
        body_limit=_images_at("/vmodel/generate"),
    ),
    # Last: every other path (the playground, files, usage, /health) answers in OpenAI's envelope.
    Dialect("openai", (openai.router, edits.router), lambda path: True, render_openai, body_limit=_openai_body),
)
_BY_NAME = {d.name: d for d in DIALECTS}


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


def webhook_secret_for(services: Services, job: Job) -> str | None:
    dialect = _BY_NAME.get(job.dialect)
    if dialect and dialect.webhook_secret:
        return dialect.webhook_secret(services, job)
    return owner_secret(services.secret, job.owner)
