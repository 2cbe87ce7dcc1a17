"""Headers of answers about a job: ``Server-Timing`` on every answer that read or waited on one (the job's
own stages: queue, gen or upstream, encode; and this node's ``edge`` time), and on a poll (a GET answered
in JSON) an ``ETag`` of the body with ``If-None-Match`` answered ``304 Not Modified``, and ``Cache-Control:
no-store`` (a poll must reach us, never a cache).

Pure ASGI (no task hop, as RateLimitHeaders): the handler's reads fill a holder (readout.JOB_READ) that this
reads when the answer's head goes out. A poll's body is a few hundred bytes of JSON: it is held, hashed, and
sent or replaced by the 304. Streams (SSE) and files pass untouched.
"""

from __future__ import annotations

import hashlib
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..job import Job
from ..readout import JOB_READ

POLL_STATUSES = (200, 202)  # fal answers 202 while a request is queued or running


def server_timing(job: Job, edge_s: float, now: float) -> str:
    """The job's stages so far, in milliseconds: queue (created → claimed), gen or upstream (claimed →
    completed, less encode), encode (its images encoded and stored), then this node's own time."""
    parts: list[tuple[str, float]] = []
    if job.started_at is not None or not job.status.is_terminal:
        parts.append(("queue", (job.started_at or now) - job.created_at))
    if job.started_at is not None:
        encode = job.encode_s or 0.0
        parts.append(("upstream" if job.route else "gen", (job.completed_at or now) - job.started_at - encode))
        if job.encode_s is not None:
            parts.append(("encode", encode))
    parts.append(("edge", edge_s))
    return ", ".join(f"{name};dur={max(0.0, seconds) * 1000:.1f}" for name, seconds in parts)


def etag_of(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison over the listed tags (``W/`` ignored), or ``*``."""
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return ""


class JobHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: list[Job] = []
        token = JOB_READ.set(holder)
        start = time.perf_counter()
        held: Message | None = None  # a poll's head, until its body is known
        chunks: list[bytes] = []

        async def send_with_headers(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                if not holder:
                    await send(message)
                    return
                headers = list(message.get("headers", []))
                timing = server_timing(holder[0], time.perf_counter() - start, time.time())
                headers.append((b"server-timing", timing.encode()))
                message = {**message, "headers": headers}
                content_type = dict(headers).get(b"content-type", b"")
                poll = scope["method"] == "GET" and message["status"] in POLL_STATUSES
                if poll and content_type.startswith(b"application/json"):
                    held = message
                    return
                await send(message)
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                await _send_poll(held, b"".join(chunks), _header(scope, b"if-none-match"), send)
            else:
                await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            JOB_READ.reset(token)


async def _send_poll(head: Message, body: bytes, if_none_match: str, send: Send) -> None:
    etag = etag_of(body)
    kept = [(k, v) for k, v in head["headers"] if k not in (b"cache-control", b"etag", b"content-length")]
    headers = [*kept, (b"etag", etag.encode()), (b"cache-control", b"no-store")]
    if if_none_match and matches(if_none_match, etag):
        await send({**head, "status": 304, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({**head, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
