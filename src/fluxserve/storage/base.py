"""The storage seam: what workers and the API need of where images live, and its errors."""

from __future__ import annotations

import re
import time
from typing import Protocol

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*$")


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


def expires_at(ttl_s: int, now: float | None = None) -> int:
    """When a URL signed now stops working: ttl_s from now, rounded up to a step of a tenth of it (1 to 60 s).
    A job's answer then holds the same signed URLs for that step, so a poller's If-None-Match still matches
    (an expiry to the second changed every answer's ETag each second)."""
    step = min(60, max(1, ttl_s // 10))
    end = int(time.time() if now is None else now) + ttl_s
    return -(-end // step) * step
