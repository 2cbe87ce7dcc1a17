"""OpenAI batches: a row per batch (its lines are jobs with its batch_id; the lines refused at create are kept
in the row for the error file). Status changes are conditional updates, so nodes reading a batch at the same
time move it once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.engine import Row

from ..job import Job
from .db import Database
from .rows import to_job
from .schema import batches, jobs


@dataclass(frozen=True)
class Batch:
    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str  # validating, in_progress, finalizing, completed, expired, cancelling, cancelled, failed
    created_at: float
    expires_at: float
    total: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)  # [{line, custom_id, code, message}]
    metadata: dict[str, Any] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None

    def row(self) -> dict[str, Any]:
        return {**self.__dict__, "rejected": json.dumps(self.rejected), "metadata": json.dumps(self.metadata)}


def _batch(row: Row[Any]) -> Batch:
    values = dict(row._mapping)
    return Batch(**{**values, "rejected": json.loads(values["rejected"]), "metadata": json.loads(values["metadata"])})


class BatchQueries(Database):
    def add_batch(self, batch: Batch) -> None:
        with self._write() as conn:
            conn.execute(batches.insert().values(**batch.row()))

    def get_batch(self, owner: str, batch_id: str) -> Batch | None:
        with self._read() as conn:
            row = conn.execute(select(batches).where(and_(batches.c.id == batch_id, batches.c.owner == owner))).first()
        return _batch(row) if row else None

    def list_batches(self, owner: str, *, after: str | None, limit: int) -> list[Batch]:
        """Newest first; ``after``: the batch id the previous page ended with."""
        query = select(batches).where(batches.c.owner == owner)
        if after is not None:
            with self._read() as conn:
                edge = conn.execute(select(batches.c.created_at).where(batches.c.id == after)).scalar()
            if edge is not None:
                query = query.where(batches.c.created_at < edge)
        with self._read() as conn:
            rows = conn.execute(query.order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit))
            return [_batch(r) for r in rows]

    def move_batch(self, batch_id: str, expect: tuple[str, ...], values: dict[str, Any]) -> bool:
        """Set ``values`` if the batch's status is one of ``expect``; whether this call moved it."""
        if "rejected" in values:
            values = {**values, "rejected": json.dumps(values["rejected"])}
        with self._write() as conn:
            done = conn.execute(
                update(batches).where(and_(batches.c.id == batch_id, batches.c.status.in_(expect))).values(**values)
            )
        return bool(done.rowcount)

    def batch_jobs(self, batch_id: str) -> list[Job]:
        with self._read() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.batch_id == batch_id))
            return [to_job(r) for r in rows]
