"""A small fal queue-API server, written from fal's documented shapes (docs.fal.ai, "Queue"):

POST /{app}/{model...} -> {request_id, status_url, response_url, cancel_url}; GET .../requests/{id}/status
-> IN_QUEUE (queue_position), IN_PROGRESS (logs), COMPLETED; GET .../requests/{id} -> {images: [{url,
width, height, content_type}], seed, ...}; PUT .../requests/{id}/cancel. Auth: ``Authorization: Key ...``.
Each request passes IN_QUEUE and IN_PROGRESS once before it completes, so a client must poll.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.support.image_server import serve_loopback
from tests.support.images_util import png_bytes


@dataclass
class FalState:
    key: str
    submits: list[dict[str, Any]] = field(default_factory=list)
    polls: dict[str, int] = field(default_factory=dict)
    canceled: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def fal_server(state: FalState) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        base = ""

        def _json(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("authorization") != f"Key {state.key}":
                self._json(401, {"detail": "Unauthorized: a valid 'Key' is needed"})
                return False
            return True

        def do_POST(self) -> None:
            if not self._authorized():
                return
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            if not isinstance(body.get("prompt"), str) or not body["prompt"]:
                self._json(422, {"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]})
                return
            rid = secrets.token_hex(8)
            with state.lock:
                state.submits.append({"id": rid, "path": self.path, "body": body})
                state.polls[rid] = 0
            root = f"{self.base}{self.path}/requests/{rid}"
            self._json(
                200,
                {
                    "request_id": rid,
                    "status_url": f"{root}/status",
                    "response_url": root,
                    "cancel_url": f"{root}/cancel",
                },
            )

        def do_PUT(self) -> None:
            rid = self.path.rstrip("/").split("/")[-2]
            state.canceled.append(rid)
            self._json(202, {"status": "CANCELLATION_REQUESTED"})

        def do_GET(self) -> None:
            if self.path.startswith("/files/"):
                w, h = (int(v) for v in self.path.split("/")[-1].removesuffix(".png").split("x"))
                data = png_bytes((w, h), (200, 30, 30))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if not self._authorized():
                return
            parts = self.path.rstrip("/").split("/")
            status = parts[-1] == "status"
            rid = parts[-2] if status else parts[-1]
            submit = next((s for s in state.submits if s["id"] == rid), None)
            if submit is None:
                self._json(404, {"detail": "Request not found"})
                return
            if status:
                with state.lock:
                    state.polls[rid] += 1
                    n = state.polls[rid]
                if n == 1:
                    self._json(200, {"status": "IN_QUEUE", "queue_position": 0})
                elif n == 2:
                    self._json(200, {"status": "IN_PROGRESS", "logs": [{"message": "step 1"}]})
                else:
                    self._json(200, {"status": "COMPLETED", "logs": []})
                return
            size = submit["body"].get("image_size") or {"width": 64, "height": 64}
            w, h = size["width"], size["height"]
            images = [
                {"url": f"{self.base}/files/{w}x{h}.png", "width": w, "height": h, "content_type": "image/png"}
                for _ in range(submit["body"].get("num_images", 1))
            ]
            self._json(200, {"images": images, "seed": submit["body"].get("seed"), "has_nsfw_concepts": [False]})

        def log_message(self, *args: object) -> None:
            pass

    with serve_loopback(Handler) as base:
        Handler.base = base
        yield base
