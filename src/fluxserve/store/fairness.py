"""The one fairness rule between keys, for both queues.

A job's priority is minus its owner's active (queued or running) jobs when it is submitted, itself
included, fixed in its row. Both queues fetch by priority, then age: the embedded queue orders its
claims by ``FETCH_ORDER``, and the PostgreSQL queue hands the same number to procrastinate, whose fetch
is priority-first. A key that floods the queue waits behind a newcomer's first job; positions a client
is told come from the same order.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, bindparam, func, select, text
from sqlalchemy.engine import Connection

from ..job import Status
from .schema import jobs

ACTIVE = (Status.QUEUED.value, Status.PROCESSING.value)


# A batch line's priority is below any interactive job's: batches use what interactive work leaves.
BATCH_OFFSET = -1_000_000


# Built once (every create runs it): building it per call cost four times its run.
_ACTIVE = select(func.count()).where(and_(jobs.c.owner == bindparam("owner"), jobs.c.status.in_(ACTIVE)))


def priority(conn: Connection, owner: str, *, batch: bool = False) -> int:
    """Computed in the submit's transaction before its row is written; the new job counts itself."""
    active = conn.execute(_ACTIVE, {"owner": owner}).scalar_one()
    return -int(active) - 1 + (BATCH_OFFSET if batch else 0)


def _priority() -> Any:
    return func.coalesce(jobs.c.priority, 0)


def fetch_order() -> tuple[Any, ...]:
    return (_priority().desc(), jobs.c.created_at, jobs.c.id)


# Over the index on (status, coalesce(priority, 0), created_at, id) (migration 16): the jobs of a higher
# priority, then those of the same priority submitted before it, ahead of the job row ``m``. The expression must
# stay as the index writes it (a bound 0 would not match it).
AHEAD_SQL = (
    "(SELECT count(*) FROM jobs o WHERE o.status = 'queued' AND coalesce(o.priority, 0) > coalesce(m.priority, 0))"
    " + (SELECT count(*) FROM jobs o WHERE o.status = 'queued'"
    " AND coalesce(o.priority, 0) = coalesce(m.priority, 0) AND (o.created_at, o.id) < (m.created_at, m.id))"
)
# The queued job row m's position in the embedded queue (1: claimed next); NULL once it is not queued.
POSITION_SQL = f"CASE WHEN m.status = 'queued' THEN 1 + {AHEAD_SQL} END"
_AHEAD = text(f"SELECT {AHEAD_SQL} FROM jobs m WHERE m.id = :id AND m.status = 'queued'")


def ahead_of(conn: Connection, job_id: str) -> int | None:
    """Queued jobs fetched before this one (any model: one embedded queue); None once it is not queued."""
    ahead = conn.execute(_AHEAD, {"id": job_id}).scalar()
    return None if ahead is None else int(ahead)
