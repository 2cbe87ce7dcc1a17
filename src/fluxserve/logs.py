"""Logs: one line per request and per job transition, as text or JSON (FLUXSERVE_LOG_FORMAT=json).

Request lines carry a request id (the client's x-request-id when it is a sane token, else a new
one), echoed in the response. Never logged: keys, query strings (signed URLs' signatures live
there), bodies or image data.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .job import EventKind, Job

request_log = logging.getLogger("fluxserve.request")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


class RequestLog:
    """Pure ASGI: the request id on the way in, one line (route template, status, ms) on the way out,
    and the same facts to ``on_done`` (the metrics' request counter)."""

    def __init__(self, app: ASGIApp, on_done: Callable[[str, str, int], None] | None = None) -> None:
        self.app = app
        self._on_done = on_done
        # Ids unique per process without a getrandom() per request (about 0.1 ms here): a random prefix, a count.
        self._prefix = secrets.token_hex(4)
        self._count = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _REQUEST_ID.fullmatch(sent) else f"{self._prefix}{next(self._count) & 0xFFFFFFFF:08x}"
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # The route template, not the raw path: ids would explode metric labels and bloat logs.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            if self._on_done is not None:
                self._on_done(route, scope["method"], status["code"])
            ms = round((time.perf_counter() - start) * 1000, 1)
            request_log.info(
                "%s %s %d %.1fms id=%s",
                scope["method"],
                route,
                status["code"],
                ms,
                request_id,
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "route": route,
                    "status": status["code"],
                    "ms": ms,
                },
            )


def job_line(job: Job, kind: EventKind) -> tuple[str, str, str, int]:
    """The arguments of a transition's log line: "job %s %s model=%s attempt=%d"."""
    return job.id, kind.value, job.spec.model, job.attempts


def job_fields(job: Job, kind: EventKind) -> dict[str, object]:
    """A transition's fields for JSON logs (FLUXSERVE_LOG_FORMAT=json)."""
    return {
        "job_id": job.id,
        "event": kind.value,
        "model": job.spec.model,
        "status": job.status.value,
        "attempt": job.attempts,
        "owner": job.owner,
        "worker": job.worker_id,
    }
