"""A Hugging Face Hub stand-in on loopback: serves a local diffusers folder as ``org/name`` through the routes
huggingface_hub's snapshot_download uses (repo info, the recursive tree, HEAD/GET ``resolve`` with Range), at
a bounded rate so a download can be watched, or killed halfway and resumed. Point HF_ENDPOINT at it."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

from tests.support.image_server import serve_loopback

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    folder: Path
    bytes_per_s: float = 0.0  # 0: as fast as it goes
    served: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header or "") per GET

    def downloads(self) -> list[tuple[str, str]]:
        """The GETs that fetched a file or its rest, not the few bytes read to size it (``bytes=a-b``)."""
        return [(name, r) for name, r in self.served if not re.fullmatch(r"bytes=\d+-\d+", r)]

    def files(self) -> dict[str, Path]:
        return {str(p.relative_to(self.folder)): p for p in sorted(self.folder.rglob("*")) if p.is_file()}


class _Handler(BaseHTTPRequestHandler):
    repos: ClassVar[dict[str, Repo]] = {}
    protocol_version = "HTTP/1.1"

    def _json(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _missing(self) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _route(self) -> tuple[str, Repo, str, str] | None:
        path = self.path.split("?")[0]
        for pattern, kind in (
            (r"^/api/models/([^/]+/[^/]+)/revision/([^/]+)$", "info"),
            (r"^/api/models/([^/]+/[^/]+)()$", "info"),
            (r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", "tree"),
            (r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", "file"),
        ):
            match = re.match(pattern, path)
            if match and match.group(1) in self.repos:
                rest = match.group(3) if match.lastindex and match.lastindex >= 3 else ""
                return kind, self.repos[match.group(1)], match.group(1), rest or ""
        return None

    def do_HEAD(self) -> None:
        self._file(head=True)

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            self._missing()
        elif route[0] == "info":
            files = route[1].files()
            self._json(
                {"id": route[2], "modelId": route[2], "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
            )
        elif route[0] == "tree":
            self._json(
                [
                    {"type": "file", "oid": _oid(p), "size": p.stat().st_size, "path": name}
                    | ({"lfs": {"oid": _sha256(p), "size": p.stat().st_size, "pointerSize": 130}} if _lfs(p) else {})
                    for name, p in route[1].files().items()
                ]
            )
        else:
            self._file(head=False)

    def _file(self, *, head: bool) -> None:
        route = self._route()
        if route is None or route[0] != "file" or route[3] not in route[1].files():
            self._missing()
            return
        repo, name = route[1], route[3]
        path = repo.files()[name]
        data = path.read_bytes()
        start, end = 0, len(data)
        ranged = self.headers.get("Range", "")
        if match := re.match(r"bytes=(\d+)-(\d*)", ranged):
            start = int(match.group(1))
            end = min(end, int(match.group(2)) + 1) if match.group(2) else end
        partial = match is not None
        self.send_response(206 if partial else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        etag = _sha256(path) if _lfs(path) else _oid(path)
        self.send_header("ETag", f'"{etag}"')
        if _lfs(path):
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Content-Length", str(end - start if not head else len(data)))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        repo.served.append((name, ranged))
        body, chunk = data[start:end], 16 * 1024
        for offset in range(0, len(body), chunk):
            self.wfile.write(body[offset : offset + chunk])
            if repo.bytes_per_s:
                time.sleep(chunk / repo.bytes_per_s)

    def log_message(self, *args: object) -> None:
        pass


def _lfs(path: Path) -> bool:
    return path.suffix == ".safetensors"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _oid(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


@contextmanager
def fake_hub(repos: dict[str, Repo]) -> Iterator[str]:
    """The hub's base URL (for HF_ENDPOINT) while the block runs."""
    _Handler.repos = repos
    with serve_loopback(_Handler) as base:
        yield base
