"""Webhook delivery: Standard Webhooks signatures, event filters, throttling, retries; never on the worker thread."""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from .errors import InvalidInput
from .jobs import Job, JobEvent
from .netguard import check_public_url
from .store import Store

log = logging.getLogger(__name__)

EVENTS = ("start", "output", "logs", "completed")
THROTTLE_S = 0.5  # output and logs events at most this often per job, as Replicate does


def owner_secret(server_secret: bytes, owner: str) -> str:
    """A key's webhook signing secret (whsec_...), derived so nothing extra is stored."""
    raw = hmac.new(server_secret, f"webhook:{owner}".encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(raw).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks: v1,base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), key from the whsec_ part."""
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def check_webhook_url(url: str, *, param: str, allow_private: bool) -> None:
    check_public_url(url, param=param, allow_private=allow_private, code="invalid_webhook_url")


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    job_id: str = field(compare=False)
    event: str = field(compare=False)
    attempt: int = field(compare=False, default=0)
    body: bytes | None = field(compare=False, default=None)
    msg_id: str = field(compare=False, default_factory=lambda: "msg_" + secrets.token_hex(12))


class WebhookSender:
    """Listens to job events; renders, signs and POSTs them from its own thread."""

    def __init__(
        self,
        store: Store,
        render: Callable[[Job], dict[str, Any] | None],
        secret_for: Callable[[Job], str | None],
        *,
        allow_private: bool,
        retry_base_s: float = 1.0,
        max_attempts: int = 5,
        timeout_s: float = 10.0,
    ) -> None:
        self._store = store
        self._render = render
        self._secret_for = secret_for
        self._allow_private = allow_private
        self._retry_base_s = retry_base_s
        self._max_attempts = max_attempts
        self._timeout_s = timeout_s
        self._queue: list[_Delivery] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._last_sent: dict[tuple[str, str], float] = {}
        # Jobs seen to have no webhook (a job's webhook never changes): their later events skip the
        # store read, which would otherwise happen on every denoising step.
        self._no_webhook: set[str] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fluxserve-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(5)

    def on_job_event(self, job_id: str, event: JobEvent) -> None:
        """Job listener: cheap and non-blocking, called on the worker thread."""
        if event == "update":
            return
        if job_id in self._no_webhook:
            if event == "completed":
                self._no_webhook.discard(job_id)
            return
        self._push(_Delivery(time.monotonic(), 0, job_id, event))

    def _push(self, delivery: _Delivery) -> None:
        with self._cond:
            self._seq += 1
            delivery.seq = self._seq
            heapq.heappush(self._queue, delivery)
            self._cond.notify()

    def _run(self) -> None:
        with httpx.Client(timeout=self._timeout_s, follow_redirects=False) as client:
            while True:
                with self._cond:
                    while not self._stopping and (not self._queue or self._queue[0].due > time.monotonic()):
                        self._cond.wait(None if not self._queue else max(0.0, self._queue[0].due - time.monotonic()))
                    if self._stopping:
                        return
                    delivery = heapq.heappop(self._queue)
                try:
                    self._deliver(client, delivery)
                except Exception:  # one bad delivery must not stop the others
                    log.exception("webhook delivery for job %s failed", delivery.job_id)

    def _deliver(self, client: httpx.Client, d: _Delivery) -> None:
        job = self._store.get_job(d.job_id)
        if job is None or not job.webhook:
            if job is not None and not job.status.is_terminal:
                self._no_webhook.add(d.job_id)
            return
        if d.event not in job.webhook.get("events", EVENTS):
            return
        if d.body is None:
            if (
                d.event in ("logs", "output")
                and time.monotonic() - self._last_sent.get((job.id, d.event), 0) < THROTTLE_S
            ):
                return  # a later event (or completed) carries the newer state
            rendered = self._render(job)
            if rendered is None:
                return
            d.body = json.dumps(rendered).encode()
            self._last_sent[(job.id, d.event)] = time.monotonic()
            if d.event == "completed":
                self._last_sent.pop((job.id, "logs"), None)
                self._last_sent.pop((job.id, "output"), None)
        url = job.webhook["url"]
        try:
            check_webhook_url(url, param="webhook", allow_private=self._allow_private)
            headers = {"content-type": "application/json", "webhook-id": d.msg_id}
            secret = self._secret_for(job)
            if secret:
                ts = int(time.time())
                headers |= {"webhook-timestamp": str(ts), "webhook-signature": sign(secret, d.msg_id, ts, d.body)}
            resp = client.post(url, content=d.body, headers=headers)
            if resp.status_code < 300:
                return
            reason = f"HTTP {resp.status_code}"
        except InvalidInput as exc:
            log.warning("webhook for job %s not sent: %s", job.id, exc.message)
            return
        except httpx.HTTPError as exc:
            reason = type(exc).__name__
        d.attempt += 1
        if d.attempt >= self._max_attempts:
            log.warning("webhook for job %s (%s) gave up after %d attempts: %s", job.id, d.event, d.attempt, reason)
            return
        d.due = time.monotonic() + self._retry_base_s * 2 ** (d.attempt - 1)
        self._push(d)
