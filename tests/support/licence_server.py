"""A stand-in for BFL's licence usage endpoint on loopback: it records every report as it arrives (before it
answers, as a real server would count it) and counts each Idempotency-Key once; it can be told to fail the next
reports or to answer late (a sender killed while it waits)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class LicenceState:
    received: list[dict[str, Any]] = field(default_factory=list)  # every request: slug, n, key, idempotency key
    counted: dict[str, int] = field(default_factory=dict)  # slug -> generations, each Idempotency-Key once
    seen: set[str] = field(default_factory=set)
    fail_next: int = 0
    answer_after_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def total(self, slug: str) -> int:
        with self.lock:
            return self.counted.get(slug, 0)


@contextmanager
def licence_server() -> Iterator[tuple[str, LicenceState]]:
    state = LicenceState()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            parts = self.path.strip("/").split("/")  # v1/licenses/models/{slug}/usage
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            ok = len(parts) == 5 and parts[:3] == ["v1", "licenses", "models"] and parts[4] == "usage"
            with state.lock:
                entry = {
                    "slug": parts[3] if ok else None,
                    "n": body.get("number_of_generations"),
                    "key": self.headers.get("x-key"),
                    "idempotency": self.headers.get("Idempotency-Key"),
                }
                state.received.append(entry)
                failing = state.fail_next > 0
                state.fail_next -= failing
                if ok and not failing and entry["idempotency"] not in state.seen:
                    state.seen.add(str(entry["idempotency"]))
                    state.counted[parts[3]] = state.counted.get(parts[3], 0) + int(entry["n"])
                delay = state.answer_after_s
            time.sleep(delay)
            status = 404 if not ok else 500 if failing else 200
            payload = json.dumps({"ok": status == 200}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
