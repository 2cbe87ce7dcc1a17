"""Where output files live, and the signed, expiring URLs that hand them out."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import shutil
import time
from pathlib import Path
from urllib.parse import quote

from .base import expires_at, valid_key


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


class LocalStorage:
    def __init__(self, root: Path, secret: bytes, base_url: str, ttl_s: int) -> None:
        self.root = root
        self._secret = secret
        self._base_url = base_url.rstrip("/")
        self._ttl_s = ttl_s
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not valid_key(key):
            raise ValueError(f"invalid storage key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        # Owner-only: images reach clients through signed URLs, never through the file system.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def open(self, key: str) -> Path:
        return self._path(key)

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete(self, key: str) -> None:
        """Idempotent; an emptied folder goes too."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        if path.parent != self.root:
            with contextlib.suppress(OSError):  # not empty, or already gone: both fine
                path.parent.rmdir()

    def stale_input_folders(self, before: float) -> list[str]:
        """inputs/<id> folders last written before then (candidates for the orphan sweep)."""
        inputs = self.root / "inputs"
        if not inputs.is_dir():
            return []
        return [f"inputs/{d.name}" for d in inputs.iterdir() if d.is_dir() and d.stat().st_mtime < before]

    def delete_folder(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def sign(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}:{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, signature: str) -> bool:
        if expires < time.time():
            return False
        # As bytes: compare_digest refuses str with non-ASCII characters, which anyone can put in a URL.
        return hmac.compare_digest(self.sign(key, expires).encode(), signature.encode("utf-8", "surrogateescape"))

    def url(self, key: str) -> str:
        expires = expires_at(self._ttl_s)
        return f"{self._base_url}/files/{quote(key)}?expires={expires}&sig={self.sign(key, expires)}"
