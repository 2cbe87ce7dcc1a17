"""The storage seam: what workers and the API need of where images live, and its errors."""

from __future__ import annotations

import re
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
