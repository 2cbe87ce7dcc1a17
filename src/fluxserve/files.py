"""Files a key uploads (Replicate's files API): the row in the store, the bytes in storage, each key seeing
only its own. What the routes call instead of the store; a file's URL may be named in that key's inputs."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from .errors import NotFound
from .offload import Offload
from .storage import Storage
from .store import Store, StoredFile


class FileService:
    def __init__(self, store: Store, storage: Storage, offload: Offload) -> None:
        self._store = store
        self._storage = storage
        self._offload = offload

    async def add(self, owner: str, name: str, content_type: str, data: bytes, metadata: dict[str, Any]) -> StoredFile:
        """The bytes first, then the row: a row never names bytes that are not there."""
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
        await self._offload.run(self._store.add_file, stored)
        return stored

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
