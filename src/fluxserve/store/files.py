"""Uploaded files (Replicate's files API): rows a key owns; their bytes live in Storage."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.engine import Row

from .db import Database
from .schema import files


@dataclass(frozen=True)
class StoredFile:
    id: str
    owner: str
    name: str
    content_type: str
    size: int
    sha256: str
    md5: str
    metadata: dict[str, Any]
    key: str
    created_at: float


def _file(row: Row[Any]) -> StoredFile:
    return StoredFile(
        row.id,
        row.owner,
        row.name,
        row.content_type,
        row.size,
        row.sha256,
        row.md5,
        json.loads(row.metadata or "{}"),
        row.key,
        row.created_at,
    )


class FileQueries(Database):
    def add_file(self, f: StoredFile) -> None:
        with self._write() as conn:
            conn.execute(files.insert().values(**{**f.__dict__, "metadata": json.dumps(f.metadata)}))

    def get_file(self, owner: str, file_id: str) -> StoredFile | None:
        with self._read() as conn:
            row = conn.execute(select(files).where(and_(files.c.id == file_id, files.c.owner == owner))).first()
        return _file(row) if row else None

    def list_files(self, owner: str, *, before: tuple[float, str] | None, limit: int) -> list[StoredFile]:
        query = select(files).where(files.c.owner == owner)
        if before is not None:
            created, file_id = before
            older = or_(files.c.created_at < created, and_(files.c.created_at == created, files.c.id < file_id))
            query = query.where(older)
        with self._read() as conn:
            rows = conn.execute(query.order_by(files.c.created_at.desc(), files.c.id.desc()).limit(limit))
            return [_file(r) for r in rows]

    def delete_file(self, owner: str, file_id: str) -> StoredFile | None:
        """The row gone (its bytes are the caller's to delete); None: not this owner's."""
        with self._write() as conn:
            row = conn.execute(select(files).where(and_(files.c.id == file_id, files.c.owner == owner))).first()
            if row is None:
                return None
            conn.execute(delete(files).where(files.c.id == file_id))
        return _file(row)

    def expired_files(self, cutoff: float, limit: int = 200) -> list[StoredFile]:
        with self._read() as conn:
            rows = conn.execute(
                select(files).where(files.c.created_at < cutoff).order_by(files.c.created_at).limit(limit)
            )
            return [_file(r) for r in rows]
