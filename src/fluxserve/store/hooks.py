"""What the store asks of its queue inside its own transactions, so a queue entry commits with its job row
or neither does; and the embedded queue's answers, where the job row is its own queue entry."""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy.engine import Connection

from ..job import Job
from . import fairness


class QueueHooks(Protocol):
    # SQL for the queue position of the job row aliased ``m`` (1: fetched next), NULL unless it is queued:
    # a poll reads its job and position in one statement (JobQueries.get_job).
    position_sql: str

    def deferred(self, conn: Connection, job: Job, priority: int) -> dict[str, Any]:
        """A new job's queue entry, written before its row in the same transaction; what the row records of it."""
        ...

    def cancel(self, conn: Connection, job_id: str) -> None: ...
    def rerouted(self, conn: Connection, job: Job) -> None: ...
    def position(self, conn: Connection, job_id: str) -> int | None: ...


class LocalHooks:
    """The job row is its own queue entry, so only the position needs a query."""

    position_sql = fairness.POSITION_SQL

    def deferred(self, conn: Connection, job: Job, priority: int) -> dict[str, Any]:
        return {}  # the row, written with its priority, is the entry

    def cancel(self, conn: Connection, job_id: str) -> None:
        pass

    def rerouted(self, conn: Connection, job: Job) -> None:
        pass  # workers read the row's route

    def position(self, conn: Connection, job_id: str) -> int | None:
        ahead = fairness.ahead_of(conn, job_id)
        return None if ahead is None else ahead + 1
