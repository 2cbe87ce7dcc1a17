"""Webhooks as a durable outbox: Standard Webhooks signatures, retries across restarts, per-receiver limits.

Transitions write delivery rows in their own transaction (store/outbox.py, by the dialects' rules).
The sender claims due rows for a while (so a crashed sender's rows come back), renders a body at
the first try and sends that same body with the same ``webhook-id`` on every retry. Sends run on a
thread pool with at most ``per_receiver`` at a time to one receiver, so a slow receiver only delays itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from .errors import InvalidInput, StoreUnavailable
from .job import Job
from .netguard import check_public_url, pin_public_url, tls
from .store import Store

log = logging.getLogger(__name__)

IDLE_S = 5.0  # the longest the sender sleeps with nothing due (wake-ups and NOTIFY bring new deliveries sooner)


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


def post_within(url: str, data: bytes, headers: dict[str, str], extensions: dict[str, Any], total_s: float) -> int:
    """One POST whose whole life (connect, send, headers, body) is bounded by ``total_s``, not each read:
    a receiver dripping its answer a byte at a time can't hold the send past its claim, so no other
    sender sends the same webhook-id meanwhile."""

    async def post() -> int:
        client = httpx.AsyncClient(timeout=total_s, follow_redirects=False, verify=tls())
        async with asyncio.timeout(total_s), client:
            resp = await client.post(url, content=data, headers=headers, extensions=extensions)
            return resp.status_code

    return asyncio.run(post())


class WebhookSender:
    def __init__(
        self,
        store: Store,
        render: Callable[[Job], dict[str, Any] | None],
        secret_for: Callable[[Job], str | None],
        *,
        allow_private: bool,
        # A dialect's own signature headers beside Standard Webhooks' (BFL's X-BFL-Signature), from the job,
        # its secret and the raw body.
        extra_headers: Callable[[Job, str, bytes], dict[str, str]] | None = None,
        retry_base_s: float = 1.0,
        max_attempts: int = 5,
        timeout_s: float = 10.0,
        per_receiver: int = 2,
        threads: int = 16,
        poll_s: float = 0.5,
    ) -> None:
        self._store = store
        self._render = render
        self._secret_for = secret_for
        self._extra_headers = extra_headers
        self._allow_private = allow_private
        self._retry_base_s = retry_base_s
        self._max_attempts = max_attempts
        self._timeout_s = timeout_s
        self._per_receiver = per_receiver
        self._threads = threads
        self._poll_s = poll_s
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fluxserve-webhook")
        self._in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fluxserve-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self, job: Job | None = None, _kind: object = None) -> None:
        """A transition in this process wrote deliveries: look now rather than at the next poll."""
        if job is None or job.webhook:
            self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(5)
        # Sends in flight finish (bounded by the timeout); unsent rows stay in the outbox for next time.
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            wait = self._poll_s
            try:
                if not self._dispatch_due():
                    wait = self._idle_wait()
            except StoreUnavailable as exc:
                log.warning("webhook outbox unavailable: %s", exc.message)
            except Exception:  # the sender must outlive any one bad row
                log.exception("webhook sender error")
            self._wake.wait(wait)

    def _idle_wait(self) -> float:
        """Nothing sent or sending: sleep until the soonest pending delivery is due (a retry), at most IDLE_S;
        a new delivery written here or announced by another node's NOTIFY wakes the sender sooner."""
        soonest = self._store.next_due()
        if soonest is None:
            return IDLE_S
        return min(IDLE_S, max(self._poll_s, soonest - time.time()))

    def _dispatch_due(self) -> bool:
        """Send what is due; whether anything was sent or is still being sent."""
        now = time.time()
        with self._lock:
            free = self._threads - sum(self._in_flight.values())
        if free <= 0:
            return True
        sent = False
        for row in self._store.due_deliveries(now, limit=max(free * 4, 50)):
            with self._lock:
                if (
                    self._in_flight[row.receiver] >= self._per_receiver
                    or sum(self._in_flight.values()) >= self._threads
                ):
                    continue
            # Claimed past the longest a send can take; a sender that dies leaves it to be retried.
            if not self._store.claim_delivery(row.id, now + self._timeout_s + 30):
                continue
            with self._lock:
                self._in_flight[row.receiver] += 1
            self._pool.submit(self._send, row)
            sent = True
        with self._lock:
            return sent or sum(self._in_flight.values()) > 0

    def _send(self, row: Any) -> None:
        try:
            self._deliver(row)
        except StoreUnavailable as exc:
            log.warning("webhook %s: outbox write failed (%s); it is retried after its claim ends", row.msg_id, exc)
        except Exception:
            log.exception("webhook %s failed", row.msg_id)
        finally:
            with self._lock:
                self._in_flight[row.receiver] -= 1
            self._wake.set()

    def _deliver(self, row: Any) -> None:
        job = self._store.get_job(row.job_id)
        if job is None or not job.webhook:
            self._store.update_delivery(row.id, state="failed", last_error="job gone", claimed_until=None)
            return
        body: str | None = row.body
        if body is None:
            rendered = self._render(job)
            if rendered is None:
                self._store.update_delivery(row.id, state="failed", last_error="nothing to render")
                return
            body = json.dumps(rendered)
            self._store.update_delivery(row.id, body=body)
        url = job.webhook["url"]
        try:
            # Resolved and checked now, sent to that address: a name that re-resolves to a private
            # address after the create (DNS rebinding) reaches nothing.
            pinned = pin_public_url(url, param="webhook", allow_private=self._allow_private, code="invalid_webhook_url")
        except InvalidInput as exc:
            log.warning("webhook for job %s not sent: %s", job.id, exc.message)
            self._store.update_delivery(row.id, state="failed", last_error=exc.message, claimed_until=None)
            return
        data = body.encode()
        headers = {"content-type": "application/json", "webhook-id": row.msg_id}
        secret = self._secret_for(job)
        if secret:
            ts = int(time.time())
            headers |= {"webhook-timestamp": str(ts), "webhook-signature": sign(secret, row.msg_id, ts, data)}
            if self._extra_headers is not None:
                headers |= self._extra_headers(job, secret, data)
        try:
            status = post_within(pinned.url, data, {**headers, **pinned.headers}, pinned.extensions, self._timeout_s)
            if status < 300:
                self._store.update_delivery(row.id, state="delivered", attempts=row.attempts + 1, claimed_until=None)
                return
            reason = f"HTTP {status}"
        except (httpx.HTTPError, TimeoutError) as exc:
            reason = (
                "TimeoutError (the whole send took too long)" if isinstance(exc, TimeoutError) else type(exc).__name__
            )
        attempts = row.attempts + 1
        if attempts >= self._max_attempts:
            log.warning(
                "webhook %s for job %s (%s) gave up after %d tries: %s", row.msg_id, job.id, row.event, attempts, reason
            )
            self._store.update_delivery(
                row.id, state="failed", attempts=attempts, last_error=reason, claimed_until=None
            )
            return
        due = time.time() + self._retry_base_s * 2 ** (attempts - 1)
        self._store.update_delivery(row.id, attempts=attempts, last_error=reason, due_at=due, claimed_until=None)
