"""job_events: one row per transition, what waiters, streams and other nodes read (plus NOTIFY on PostgreSQL)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import and_, bindparam, func, select
from sqlalchemy.engine import Connection

from ..job import EventKind, Job, JobEvent
from .db import Database, send
from .outbox import WebhookRules, enqueue_webhooks
from .schema import job_events

NOTIFY_CHANNEL = "fluxserve_job"
KEYS_CHANGED = "*keys"  # a payload's job id when an API key was revoked or changed (no job id starts with "*")


_INSERT_EVENT = job_events.insert()  # built once: it is in every create's and transition's transaction
# On PostgreSQL the NOTIFY rides on the insert (RETURNING evaluates it): one round trip, not two.
_EVENTS = (  # a job's events after one: each upstream job reads them when it starts, waiters as they come
    select(job_events)
    .where(and_(job_events.c.job_id == bindparam("job_id"), job_events.c.id > bindparam("after")))
    .order_by(job_events.c.id)
)
_INSERT_EVENT_NOTIFY = job_events.insert().returning(func.pg_notify(NOTIFY_CHANNEL, bindparam("notice")))


def append_event(
    conn: Connection, job: Job, kind: EventKind, payload: dict[str, Any], rules: Mapping[str, WebhookRules]
) -> None:
    """The event row, its NOTIFY, and the webhook deliveries the job's dialect sends for it."""
    now = time.time()
    row = {"job_id": job.id, "attempt": job.attempts, "kind": kind.value, "payload": json.dumps(payload), "at": now}
    hooked = bool(job.webhook) and job.dialect in rules
    if conn.dialect.name == "postgresql":  # delivered at commit: a listener that re-reads sees this row
        # ":w" when this transition may have written webhook deliveries: only then do senders look.
        conn.execute(_INSERT_EVENT_NOTIFY, {**row, "notice": f"{job.id}:{kind.value}{':w' if hooked else ''}"})
    else:
        send(conn, _INSERT_EVENT, row)
    if hooked:
        enqueue_webhooks(conn, job, kind, now, rules[job.dialect])


class EventQueries(Database):
    def last_event_id(self, job_id: str) -> int:
        with self._read() as conn:
            value = conn.execute(select(func.max(job_events.c.id)).where(job_events.c.job_id == job_id)).scalar()
        return int(value or 0)

    def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        with self._read() as conn:
            rows = conn.execute(_EVENTS, {"job_id": job_id, "after": after}).all()
        return [JobEvent(r.id, r.job_id, r.attempt, EventKind(r.kind), json.loads(r.payload), r.at) for r in rows]
