"""Where output files live, and the signed, expiring URLs that hand them out."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import shutil
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


class StorageUnreachable(OSError):
    """The object store did not answer (down, partitioned, refusing): worth retrying, unlike a full disk.
    Workers retry it for a while (FLUXSERVE_STORAGE_RETRY_S); the API answers 503 with Retry-After."""


class Storage(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def read(self, key: str) -> bytes: ...
    def url(self, key: str) -> str: ...
    def delete(self, key: str) -> None: ...
    def stale_input_folders(self, before: float) -> list[str]: ...
    def delete_folder(self, prefix: str) -> None: ...


def valid_key(key: str) -> bool:
    return bool(_KEY_RE.match(key)) and ".." not in key


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
        expires = int(time.time()) + self._ttl_s
        return f"{self._base_url}/files/{quote(key)}?expires={expires}&sig={self.sign(key, expires)}"


def build_storage(
    spec: str | None,
    default_root: Path,
    secret: bytes,
    base_url: str,
    ttl_s: int,
    endpoint_url: str | None = None,
    public_url: str | None = None,
) -> Storage:
    """--storage: file:///path (or none: the data dir's outputs folder) or s3://bucket/prefix."""
    if spec is None or spec.startswith("file://"):
        root = Path(spec.removeprefix("file://")) if spec else default_root
        return LocalStorage(root, secret, base_url, ttl_s)
    if spec.startswith("s3://"):
        from .objectstore import S3Storage

        bucket, _, prefix = spec.removeprefix("s3://").partition("/")
        return S3Storage.from_env(bucket, prefix.strip("/"), ttl_s, endpoint_url, public_url)
    raise ValueError(f"storage must be file:///path or s3://bucket/prefix; got {spec!r}")
