"""A loopback webhook receiver that verifies Standard Webhooks signatures with the `standardwebhooks` package."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.support.image_server import serve_loopback


@dataclass
class Received:
    secret: str | None = None
    fail_first: int = 0  # answer 500 to this many deliveries first
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    attempts: int = 0
    event: threading.Event = field(default_factory=threading.Event)


@contextmanager
def webhook_receiver(received: Received) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            received.attempts += 1
            if received.attempts <= received.fail_first:
                self.send_response(500)
                self.end_headers()
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            if received.secret is not None:
                try:
                    Webhook(received.secret).verify(body, headers)
                except WebhookVerificationError:
                    received.bad_signatures += 1
            received.deliveries.append({"headers": headers, "body": json.loads(body), "raw": body})
            received.event.set()
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with serve_loopback(Handler) as base:
        yield f"{base}/hook"
