"""What is read about many jobs at once: per-key usage, /metrics aggregates, the retention sweep's rows."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.engine import Connection, Row

from ..job import Job, Status
from ..limits import Usage, day_start
from .db import Database
from .rows import to_job
from .schema import job_events, jobs, webhook_deliveries


def usage(conn: Connection, owner: str, now: float) -> Usage:
    """A key's counts for its limits, inside the caller's transaction."""
    mine = jobs.c.owner == owner
    active = select(func.count()).where(and_(mine, jobs.c.status.in_([Status.QUEUED.value, Status.PROCESSING.value])))
    minute = select(func.count(), func.min(jobs.c.created_at)).where(and_(mine, jobs.c.created_at >= now - 60))
    today = select(func.coalesce(func.sum(func.coalesce(jobs.c.images, 1)), 0)).where(
        and_(mine, jobs.c.created_at >= day_start(now))
    )
    in_minute, oldest = conn.execute(minute).one()
    return Usage(int(conn.execute(active).scalar_one()), int(in_minute), oldest, int(conn.execute(today).scalar_one()))


class Reports(Database):
    def queue_depth(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).where(jobs.c.status == Status.QUEUED.value)).scalar_one())

    def expirable(self, now: float, retention_s: float | None, limit: int) -> list[Job]:
        """Ended jobs whose files outlived their retention (their own, else ``retention_s``; None: jobs
        without their own are kept) and are not yet deleted."""
        ended = jobs.c.status.in_([s.value for s in Status if s.is_terminal])
        ended_at = func.coalesce(jobs.c.completed_at, jobs.c.created_at)
        own = and_(jobs.c.retain_s.is_not(None), ended_at + jobs.c.retain_s < now)
        due = own if retention_s is None else or_(own, and_(jobs.c.retain_s.is_(None), ended_at < now - retention_s))
        query = select(jobs).where(and_(ended, jobs.c.files_expired_at.is_(None), due))
        with self._read() as conn:
            return [to_job(r) for r in conn.execute(query.order_by(jobs.c.created_at).limit(limit))]

    def mark_files_expired(self, job_id: str, now: float) -> bool:
        """Once per job whichever node swept it; its events and sent webhooks go with its files."""
        with self._write() as conn:
            done = conn.execute(
                update(jobs)
                .where(and_(jobs.c.id == job_id, jobs.c.files_expired_at.is_(None)))
                .values(files_expired_at=now)
            ).rowcount
            if done:
                conn.execute(job_events.delete().where(job_events.c.job_id == job_id))
                conn.execute(
                    webhook_deliveries.delete().where(
                        and_(webhook_deliveries.c.job_id == job_id, webhook_deliveries.c.state != "pending")
                    )
                )
        return bool(done)

    def references_input(self, prefix: str) -> bool:
        """Whether a job whose files are kept names this inputs/<hex> folder (the spec holds the keys)."""
        if not re.fullmatch(r"inputs/[0-9a-f]+", prefix):  # no LIKE wildcards in what is matched
            raise ValueError(f"not an input folder: {prefix!r}")
        query = select(jobs.c.id).where(and_(jobs.c.files_expired_at.is_(None), jobs.c.spec.like(f'%"{prefix}/%')))
        with self._read() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def job_usage(self, since: float, owner: str | None = None, *, requests: bool = False) -> list[Row[Any]]:
        """The columns usage is computed from, for jobs created since then (one key's, or all); with
        ``requests``, each job's request too (its end user is read from it)."""
        cols = [jobs.c[n] for n in ("owner", "model", "status", "created_at", "started_at", "completed_at")]
        if requests:
            cols.append(jobs.c.request)
        query = select(*cols, jobs.c.images, jobs.c.megapixels, jobs.c.cost).where(jobs.c.created_at >= since)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        with self._read() as conn:
            return list(conn.execute(query))

    def metrics(self) -> dict[str, list[tuple[Any, ...]]]:
        """Aggregates for /metrics, from the tables every node shares (one read, grouped in SQL)."""
        ended = jobs.c.status.in_([s.value for s in Status if s.is_terminal])
        queries = {
            "jobs": select(jobs.c.model, jobs.c.status, func.count()).group_by(jobs.c.model, jobs.c.status),
            "output": select(
                jobs.c.model, func.sum(func.coalesce(jobs.c.images, 1)), func.sum(func.coalesce(jobs.c.megapixels, 0))
            )
            .where(jobs.c.status == Status.SUCCEEDED.value)
            .group_by(jobs.c.model),
            "stages": select(
                func.sum(jobs.c.started_at - jobs.c.created_at),
                func.sum(jobs.c.completed_at - jobs.c.started_at - func.coalesce(jobs.c.encode_s, 0)),
                func.sum(func.coalesce(jobs.c.encode_s, 0)),
                func.count(),
            ).where(and_(ended, jobs.c.started_at.is_not(None), jobs.c.completed_at.is_not(None))),
            "webhooks": select(webhook_deliveries.c.state, func.count()).group_by(webhook_deliveries.c.state),
        }
        with self._read() as conn:
            return {name: [tuple(row) for row in conn.execute(q)] for name, q in queries.items()}
