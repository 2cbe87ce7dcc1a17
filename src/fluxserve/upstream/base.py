"""What every provider kind shares: its errors, tasks, results, inputs and the one HTTP call.

Each kind's request and result shapes live beside it (bfl.py, replicate.py, fal.py, openai.py), from a
job's spec (the registry's names), over httpx.

A provider turns one image of a job into one upstream *task* (BFL, Replicate, fal: an id to poll) or,
for a synchronous OpenAI Images server, into the images at once. Errors are two kinds: ``Rejected``
(the provider refused the request: moderation, bad input; not retried) and ``Unavailable`` (429, 5xx,
timeouts, connection errors; retried, then failed over).
"""

from __future__ import annotations

import base64
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..errors import FluxServeError, UpstreamFailed
from ..models.upstreams import UpstreamConfig
from ..spec import GenerationSpec

MAX_MESSAGE = 500  # an upstream's error text is passed on, but not a megabyte of it


class Rejected(FluxServeError):
    """The provider refused the request (4xx other than 429): the job fails with its message, once."""

    code = "upstream_rejected"

    def __init__(self, message: str, *, status: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.status = status  # the provider's HTTP status, where it answered one


class Malformed(Rejected):
    """The provider answered, but not in its documented shape (a JSON list, bad base64, a field missing):
    the job fails once with what was wrong, and the upstream counts a failure."""

    code = "upstream_malformed"


class AccountError(UpstreamFailed):
    """The provider refused our credentials or our account (401, 402, 403), or does not know the model we
    asked for (404 on submit): the operator's problem, not the client's. The upstream is marked unhealthy at
    once, the job fails over, and the client is told of a provider problem (502), never of a bad request."""


# What a provider's parsing code raises on an answer of the wrong shape (binascii.Error is a ValueError).
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError)


class Unavailable(FluxServeError):
    """The provider could not answer now (429, 5xx, timeout, connection): retry, then fail over."""

    code = "upstream_unavailable"

    def __init__(self, message: str, *, maybe_sent: bool = False) -> None:
        super().__init__(message)
        # The request may have reached the provider (a read timeout, a dropped connection): not an
        # unanswered connect, so a second submit could start a second, charged task.
        self.maybe_sent = maybe_sent


@dataclass(frozen=True)
class Task:
    """One upstream task: what the job event records before polling, so a restarted worker resumes it."""

    id: str
    urls: dict[str, str] = field(default_factory=dict)  # the provider's own status/result/cancel URLs

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.id, "urls": self.urls}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        return cls(str(d["task_id"]), dict(d.get("urls") or {}))


@dataclass(frozen=True)
class Done:
    """A finished task's images: URLs to fetch (on the provider's host) or bytes it sent inline."""

    urls: list[str] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)
    # The seed the provider says it used for each image (blobs first, then urls); None where it does not say.
    seeds: list[int | None] = field(default_factory=list)


@dataclass(frozen=True)
class Inputs:
    images: list[bytes]
    mask: bytes | None = None

    def data_urls(self) -> list[str]:
        return [_data_url(b) for b in self.images]


def _data_url(blob: bytes) -> str:
    mime = "image/jpeg" if blob[:3] == b"\xff\xd8\xff" else "image/webp" if blob[8:12] == b"WEBP" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(blob).decode()}"


def _message(resp: httpx.Response) -> str:
    """The provider's own words: OpenAI's error.message, Replicate's/BFL's/fal's detail, or the body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:MAX_MESSAGE] or f"HTTP {resp.status_code}"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:MAX_MESSAGE]
        for key in ("detail", "error", "message", "title"):
            if body.get(key):
                value = body[key]
                return (value if isinstance(value, str) else json.dumps(value))[:MAX_MESSAGE]
    return json.dumps(body)[:MAX_MESSAGE]


@functools.lru_cache(maxsize=512)
def _parsed(url: str) -> httpx.URL:
    """An upstream's URLs are few (its submit routes, its task URLs while they run): each parsed once, not on
    every request (httpx parses a str twice building one: 45 against 24 us per request here)."""
    return httpx.URL(url)


def call(client: httpx.Client, method: str, url: str, **kw: Any) -> Any:
    """One request; its JSON, or the error kind its status says."""
    try:
        resp = client.request(method, _parsed(url), **kw)
    except httpx.HTTPError as exc:
        unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        raise Unavailable(f"the upstream did not answer ({type(exc).__name__})", maybe_sent=not unsent) from exc
    if resp.status_code == 429 or resp.status_code >= 500:
        raise Unavailable(f"the upstream answered HTTP {resp.status_code}: {_message(resp)}")
    if resp.status_code in (401, 402, 403):
        raise AccountError(f"HTTP {resp.status_code}: {_message(resp)}")
    if resp.status_code >= 400:
        raise Rejected(_message(resp), status=resp.status_code)
    try:
        return resp.json()
    except ValueError as exc:  # it answered: a task may exist, so this is never retried or failed over
        raise Malformed(f"HTTP {resp.status_code} with a body that is not JSON: {resp.text[:200]!r}") from exc


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or ""), parts.port or (443 if parts.scheme == "https" else 80)


def ratio(width: int, height: int) -> str:
    d = math.gcd(width, height)
    return f"{width // d}:{height // d}"


class Provider:
    """A kind's shapes. ``submit`` returns a Task to poll, or Done when the provider answers at once."""

    # It calls a webhook when a task ends: submit gets ``webhook=(url, secret)`` when --public-url is set.
    takes_webhooks = False

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def own_url(self, url: str | None, default: str) -> str:
        """A URL the provider handed back is followed (with our API key) only on its own scheme, host and port:
        never redirecting our worker, nor sending the key elsewhere or over plain HTTP."""
        if url and _origin(url) == _origin(self.config.base_url):
            return url
        return default

    def submit(
        self, client: httpx.Client, spec: GenerationSpec, model: str, inputs: Inputs, key: str | None, **kw: Any
    ) -> Any:
        """``idempotency_key``: sent as Idempotency-Key (a fluxserve upstream replays the first answer).
        ``wait_s``: how long the job may still wait, for a provider that answers with the images themselves."""
        raise NotImplementedError

    def images_per_task(self, spec: GenerationSpec, model: str) -> int:
        """How many of a job's images one task makes (BFL: one; the rest take a count)."""
        return spec.num_images

    def submit_headers(self, key: str | None, kw: dict[str, Any]) -> dict[str, str]:
        extra = {"Idempotency-Key": kw["idempotency_key"]} if kw.get("idempotency_key") else {}
        return self.headers(key) | extra

    def poll(self, client: httpx.Client, task: Task, key: str | None) -> Done | None:
        raise NotImplementedError

    def cancel(self, client: httpx.Client, task: Task, key: str | None) -> None:
        """Best effort: the provider stops (and may not charge for) a task nobody wants any more."""
