"""Files a key uploads (Replicate's files API): the row in the store, the bytes in storage, each key seeing
only its own. What the routes call instead of the store; a file's URL may be named in that key's inputs."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from .errors import NotFound, QuotaExceeded
from .offload import Offload
from .sizes import human_bytes
from .storage import Storage
from .store import Store, StoredFile


class FileService:
    def __init__(
        self, store: Store, storage: Storage, offload: Offload, *, max_files: int = 0, max_bytes: int = 0
    ) -> None:
        self._store = store
        self._storage = storage
        self._offload = offload
        self.max_files, self.max_bytes = max_files, max_bytes  # per key; 0: no limit

    def _refuse(self, totals: tuple[int, int], size: int) -> QuotaExceeded:
        count, used = totals
        limits = []
        if self.max_files:
            limits.append(f"{count} of {self.max_files} files")
        if self.max_bytes:
            limits.append(f"{human_bytes(used)} of {human_bytes(self.max_bytes)}")
        return QuotaExceeded(
            f"This key keeps {' and '.join(limits)} of uploads; this file ({human_bytes(size)}) would pass its "
            "quota. Delete files it no longer needs (DELETE /v1/files/{id}); uploads also expire.",
            param="content",
        )

    async def add(
        self, owner: str, name: str, content_type: str, data: bytes, metadata: dict[str, Any], *, quota: bool = True
    ) -> StoredFile:
        """The bytes first, then the row: a row never names bytes that are not there. Within the key's quota:
        checked before the bytes are stored, and again with the row (a concurrent upload may have won).
        ``quota`` False: a file the server writes for the key (a batch's results), never refused."""
        max_files, max_bytes = (self.max_files, self.max_bytes) if quota else (0, 0)
        if max_files or max_bytes:
            count, used = await self._offload.run(self._store.file_totals, owner)
            if (max_files and count + 1 > max_files) or (max_bytes and used + len(data) > max_bytes):
                raise self._refuse((count, used), len(data))
        file_id = secrets.token_hex(12)
        stored = StoredFile(
            file_id,
            owner,
            name,
            content_type,
            len(data),
            hashlib.sha256(data).hexdigest(),
            hashlib.md5(data).hexdigest(),
            metadata,
            f"uploads/{file_id}/content",
            time.time(),
        )
        await self._offload.run_slow(self._storage.put, stored.key, data)
        refused = await self._offload.run(
            lambda: self._store.add_file(stored, max_count=max_files, max_bytes=max_bytes)
        )
        if refused is not None:
            await self._offload.run_slow(self._storage.delete, stored.key)
            raise self._refuse(refused, len(data))
        return stored

    async def totals(self, owner: str) -> dict[str, int]:
        """What the key keeps uploaded now, for its usage."""
        count, used = await self._offload.run(self._store.file_totals, owner)
        return {"count": count, "bytes": used}

    async def find(self, owner: str, file_id: str) -> StoredFile | None:
        return await self._offload.run(self._store.get_file, owner, file_id)

    async def get(self, owner: str, file_id: str) -> StoredFile:
        found = await self.find(owner, file_id)
        if found is None:
            raise NotFound(f"No file with id {file_id!r}.", param="file_id")
        return found

    async def list(self, owner: str, *, before: tuple[float, str] | None, limit: int) -> list[StoredFile]:
        return await self._offload.run(lambda: self._store.list_files(owner, before=before, limit=limit))

    async def read(self, stored: StoredFile) -> bytes:
        return await self._offload.run_slow(self._storage.read, stored.key)

    async def delete(self, owner: str, file_id: str) -> None:
        """The row first (the file is gone for the caller at once), then the bytes."""
        gone = await self._offload.run(self._store.delete_file, owner, file_id)
        if gone is None:
            raise NotFound(f"No file with id {file_id!r}.", param="file_id")
        await self._offload.run_slow(self._storage.delete, gone.key)
