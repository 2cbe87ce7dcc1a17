"""BFL self-hosted licence usage: counts written in a job's success transaction, claimed in batches by a
sender (licensing.py), marked sent when BFL acknowledges them. A batch keeps its id through every try, so a
batch re-sent after a sender died mid-request carries the same Idempotency-Key."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from .db import Database
from .schema import licence_usage


@dataclass(frozen=True)
class UsageBatch:
    id: str
    slug: str
    generations: int
    jobs: int


def record_usage(conn: Connection, job_id: str, slug: str, generations: int, now: float) -> None:
    """In the caller's (the success's) transaction; a job already counted is not counted again."""
    if conn.execute(select(licence_usage.c.id).where(licence_usage.c.job_id == job_id)).first() is None:
        conn.execute(insert(licence_usage).values(job_id=job_id, slug=slug, generations=generations, created_at=now))


class LicenceQueries(Database):
    def claim_usage(self, now: float, lease_s: float, limit: int = 1000) -> UsageBatch | None:
        """A batch to send: one whose sender's lease ran out (the same id again), else a new one of up to
        ``limit`` uncounted rows of one slug. None: nothing to send."""
        expired = or_(licence_usage.c.claimed_at.is_(None), licence_usage.c.claimed_at < now - lease_s)
        with self._write() as conn:
            stale = conn.execute(
                select(licence_usage.c.batch)
                .where(and_(licence_usage.c.sent_at.is_(None), licence_usage.c.batch.is_not(None), expired))
                .limit(1)
            ).first()
            if stale is not None:
                batch = str(stale.batch)
                # Conditional, so two nodes that saw it expire at once do not both take it (PostgreSQL rechecks
                # the condition on the row the other committed).
                taken = conn.execute(
                    update(licence_usage).where(and_(licence_usage.c.batch == batch, expired)).values(claimed_at=now)
                )
                if taken.rowcount == 0:
                    return None
            else:
                first = conn.execute(
                    select(licence_usage.c.slug).where(licence_usage.c.batch.is_(None)).order_by(licence_usage.c.id)
                ).first()
                if first is None:
                    return None
                batch = secrets.token_hex(16)
                ids = select(licence_usage.c.id).where(
                    and_(licence_usage.c.batch.is_(None), licence_usage.c.slug == first.slug)
                )
                ids = ids.order_by(licence_usage.c.id).limit(limit)
                # batch IS NULL again in the update itself: rows another node batched meanwhile are skipped
                # (PostgreSQL rechecks it on the committed row), never moved into this batch too.
                conn.execute(
                    update(licence_usage)
                    .where(and_(licence_usage.c.id.in_(ids.scalar_subquery()), licence_usage.c.batch.is_(None)))
                    .values(batch=batch, claimed_at=now)
                )
            row = conn.execute(
                select(licence_usage.c.slug, func.sum(licence_usage.c.generations), func.count())
                .where(licence_usage.c.batch == batch)
                .group_by(licence_usage.c.slug)
            ).first()
        if row is None:  # every row it chose was batched by another node first
            return None
        return UsageBatch(batch, str(row[0]), int(row[1]), int(row[2]))

    def usage_sent(self, batch: str, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                update(licence_usage)
                .where(and_(licence_usage.c.batch == batch, licence_usage.c.sent_at.is_(None)))
                .values(sent_at=now, last_error=None)
            )

    def usage_failed(self, batch: str, error: str) -> None:
        """Kept for the next try (after the lease), the reason recorded for `fluxserve usage --licensing`."""
        with self._write() as conn:
            conn.execute(update(licence_usage).where(licence_usage.c.batch == batch).values(last_error=error[:500]))

    def usage_report(self) -> list[dict[str, object]]:
        """Per slug and UTC day: generations recorded, reported (acknowledged) and waiting; the last error."""
        day = (
            func.date(func.to_timestamp(licence_usage.c.created_at))
            if not self.is_sqlite
            else func.date(licence_usage.c.created_at, "unixepoch")
        )
        sent = func.sum(licence_usage.c.generations).filter(licence_usage.c.sent_at.is_not(None))
        with self._read() as conn:
            rows = conn.execute(
                select(
                    licence_usage.c.slug,
                    day.label("day"),
                    func.sum(licence_usage.c.generations),
                    sent,
                    func.max(licence_usage.c.last_error),
                )
                .group_by(licence_usage.c.slug, "day")
                .order_by("day", licence_usage.c.slug)
            ).all()
        return [
            {
                "slug": r[0],
                "day": str(r[1]),
                "generations": int(r[2]),
                "reported": int(r[3] or 0),
                "pending": int(r[2]) - int(r[3] or 0),
                "last_error": r[4],
            }
            for r in rows
        ]
