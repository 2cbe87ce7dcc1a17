"""Uploaded files (Replicate's files API): rows a key owns; their bytes live in Storage."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.engine import Connection, Row

from .db import Database
from .schema import files

FILES_LOCK = 0x666C6669  # one key's uploads take turns while its quota is counted (PostgreSQL)


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


def _totals(conn: Connection, owner: str) -> tuple[int, int]:
    row = conn.execute(
        select(func.count(), func.coalesce(func.sum(files.c.size), 0)).where(files.c.owner == owner)
    ).one()
    return int(row[0]), int(row[1])


class FileQueries(Database):
    def add_file(self, f: StoredFile, *, max_count: int = 0, max_bytes: int = 0) -> tuple[int, int] | None:
        """The row, unless the owner's files would then pass ``max_count`` files or ``max_bytes`` (0: no
        limit), counted in the same transaction (one key's uploads take turns on PostgreSQL). None: added;
        else the owner's (count, bytes) that refused it."""
        with self._write() as conn:
            if max_count or max_bytes:
                if conn.dialect.name == "postgresql":
                    conn.execute(select(func.pg_advisory_xact_lock(FILES_LOCK, func.hashtext(f.owner))))
                count, size = _totals(conn, f.owner)
                if (max_count and count + 1 > max_count) or (max_bytes and size + f.size > max_bytes):
                    return count, size
            conn.execute(files.insert().values(**{**f.__dict__, "metadata": json.dumps(f.metadata)}))
        return None

    def file_totals(self, owner: str) -> tuple[int, int]:
        """(files, bytes) the owner keeps now."""
        with self._read() as conn:
            return _totals(conn, owner)

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
