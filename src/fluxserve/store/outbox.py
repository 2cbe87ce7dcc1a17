"""The webhook outbox: one row per delivery, written in the transaction of the transition that causes it.

Which transitions send which events is a dialect's rule (``WebhookRules``, a field of its record in
api/dialects.py); the store only writes the rows those rules name.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.engine import Connection, Row

from ..job import EventKind, Job
from .db import Database
from .schema import webhook_deliveries


@dataclass(frozen=True)
class WebhookRules:
    """The event names each transition sends; ``throttled`` ones are sent at most every ``throttle_s`` per
    job, a pending one carrying the newer state (bodies are rendered when first sent)."""

    on: Mapping[EventKind, tuple[str, ...]]
    throttled: frozenset[str] = field(default_factory=frozenset)
    throttle_s: float = 0.5

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for names in self.on.values() for n in names))


def enqueue_webhooks(conn: Connection, job: Job, kind: EventKind, now: float, rules: WebhookRules) -> None:
    """The outbox rows this transition causes, in the caller's transaction."""
    assert job.webhook is not None
    wanted = job.webhook.get("events") or ()
    url = urlsplit(job.webhook["url"])
    receiver = f"{url.scheme}://{url.hostname}:{url.port or (443 if url.scheme == 'https' else 80)}"
    for name in rules.on.get(kind, ()):
        if name not in wanted:
            continue
        due = now
        if name in rules.throttled:
            same = and_(webhook_deliveries.c.job_id == job.id, webhook_deliveries.c.event == name)
            pending = conn.execute(
                select(func.count()).where(
                    and_(same, webhook_deliveries.c.state == "pending", webhook_deliveries.c.body.is_(None))
                )
            ).scalar_one()
            if pending:
                continue
            last = conn.execute(select(func.max(webhook_deliveries.c.created_at)).where(same)).scalar()
            if last is not None:
                due = max(now, float(last) + rules.throttle_s)
        conn.execute(
            webhook_deliveries.insert().values(
                msg_id="msg_" + secrets.token_hex(12),
                job_id=job.id,
                event=name,
                receiver=receiver,
                state="pending",
                attempts=0,
                due_at=due,
                created_at=due,
            )
        )


# Built once: every idle sender asks it between deliveries.
_CLAIM_END = func.coalesce(webhook_deliveries.c.claimed_until, 0)
_NEXT_DUE = select(
    func.min(case((webhook_deliveries.c.due_at < _CLAIM_END, _CLAIM_END), else_=webhook_deliveries.c.due_at))
).where(webhook_deliveries.c.state == "pending")


class OutboxQueries(Database):
    def due_deliveries(self, now: float, limit: int, per_receiver: int = 4) -> list[Row[Any]]:
        """The oldest due deliveries, at most ``per_receiver`` of each receiver: one receiver's backlog
        never fills the window and keeps the others' webhooks from being sent."""
        due = and_(
            webhook_deliveries.c.state == "pending",
            webhook_deliveries.c.due_at <= now,
            or_(webhook_deliveries.c.claimed_until.is_(None), webhook_deliveries.c.claimed_until < now),
        )
        turn = (
            func.row_number()
            .over(
                partition_by=webhook_deliveries.c.receiver,
                order_by=(webhook_deliveries.c.due_at, webhook_deliveries.c.id),
            )
            .label("turn")
        )
        ranked = select(webhook_deliveries, turn).where(due).subquery()
        query = select(ranked).where(ranked.c.turn <= per_receiver).order_by(ranked.c.due_at).limit(limit)
        with self._read() as conn:
            return list(conn.execute(query))

    def next_due(self) -> float | None:
        """When the soonest pending delivery can be sent (its due time, or the end of a claim on it)."""
        with self._read() as conn:
            value = conn.execute(_NEXT_DUE).scalar()
        return None if value is None else float(value)

    def claim_delivery(self, delivery_id: int, until: float) -> bool:
        """Claim a due delivery for one send. Only a job's oldest pending delivery can be claimed, so a job's
        events reach its receiver in order whichever node sends them (a retrying one holds the later ones)."""
        now = time.time()
        free = or_(webhook_deliveries.c.claimed_until.is_(None), webhook_deliveries.c.claimed_until < now)
        earlier = webhook_deliveries.alias("earlier")
        first = ~(
            select(earlier.c.id)
            .where(
                and_(
                    earlier.c.job_id == webhook_deliveries.c.job_id,
                    earlier.c.state == "pending",
                    earlier.c.id < webhook_deliveries.c.id,
                )
            )
            .exists()
        )
        mine = and_(webhook_deliveries.c.id == delivery_id, webhook_deliveries.c.state == "pending", free, first)
        with self._write() as conn:
            return conn.execute(update(webhook_deliveries).where(mine).values(claimed_until=until)).rowcount == 1

    def update_delivery(self, delivery_id: int, **values: Any) -> None:
        with self._write() as conn:
            conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id).values(**values))

    def deliveries(self, job_id: str) -> list[Row[Any]]:
        with self._read() as conn:
            return list(
                conn.execute(
                    select(webhook_deliveries)
                    .where(webhook_deliveries.c.job_id == job_id)
                    .order_by(webhook_deliveries.c.id)
                )
            )
