"""Where output files live, and the signed, expiring URLs that hand them out."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*$")


def load_or_create_secret(path: Path) -> bytes:
    """The server secret that signs file URLs, created once per data dir."""
    if path.is_file():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    return secret


class Storage(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def open(self, key: str) -> Path: ...
    def url(self, key: str) -> str: ...
    def delete(self, key: str) -> None: ...


def valid_key(key: str) -> bool:
    return bool(_KEY_RE.match(key)) and ".." not in key


class LocalStorage:
    def __init__(self, root: Path, secret: bytes, base_url: str, ttl_s: int) -> None:
        self.root = root
        self._secret = secret
        self._base_url = base_url.rstrip("/")
        self._ttl_s = ttl_s
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not valid_key(key):
            raise ValueError(f"invalid storage key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def open(self, key: str) -> Path:
        return self._path(key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def sign(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}:{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, signature: str) -> bool:
        if expires < time.time():
            return False
        return hmac.compare_digest(self.sign(key, expires), signature)

    def url(self, key: str) -> str:
        expires = int(time.time()) + self._ttl_s
        return f"{self._base_url}/files/{quote(key)}?expires={expires}&sig={self.sign(key, expires)}"
