"""The record a dialect module exports as ``DIALECT``: everything the app needs to serve it.

A new dialect is one module (its router, schemas with ``to_spec``, job rendering, and this record)
plus one line in api/dialects.py's list.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from ..errors import FluxServeError
from ..job import Job
from ..store import WebhookRules
from .bodylimit import IMAGE_JSON_BODY_BYTES, JSON_BODY_BYTES, json_only
from .deps import Services

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
    # Its own signature headers beside Standard Webhooks', from the secret and the raw body (BFL's).
    webhook_headers: Callable[[str, bytes], dict[str, str]] | None = None
    # Which transitions send which webhook events (the job's subscription picks among their names).
    webhook_rules: WebhookRules | None = None
    # The body limit of each of its routes (api/bodylimit.py), by path.
    body_limit: Callable[[str], int] = json_only
    # Its routes are served under this prefix too ("/bfl": /bfl/v1/flux-pro), as the seed relay does.
    prefix: str = ""
    # Runs while the app serves (entered once its services are wired): what the dialect's routes need running.
    lifespan: Callable[[FastAPI, Services], AbstractAsyncContextManager[None]] | None = None


def images_at(*prefixes: str) -> Callable[[str], int]:
    """A body limit: JSON with inline images on routes under these prefixes, plain JSON elsewhere."""
    return lambda path: IMAGE_JSON_BODY_BYTES if path.startswith(prefixes) else JSON_BODY_BYTES
