"""The one fenced write every job change goes through: an UPDATE of one row, only while it is in an expected
status (and, when given, the same attempt, worker, route, or a still-expired lease), its event in the same
transaction.

Its statements are built once per shape (which of the fence's conditions are present, which columns change)
and cached: building an UPDATE ... RETURNING per call, and SQLAlchemy's cache key for it, cost more than
running it (a claim, an upstream note and a completion each paid it on every relayed image; bench/api_edge.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement, Select, Update

from ..job import EventKind, Job, Status
from .credits import give_back
from .db import send
from .events import append_event
from .outbox import WebhookRules
from .rows import to_job
from .schema import jobs

ANY_ROUTE: Any = object()  # queued(): jobs of every route
Values = dict[str, Any] | Callable[[Job], dict[str, Any]]
NEXT_ATTEMPT = jobs.c.attempts + 1  # a claim's "attempts": the only SQL expression a transition sets
_EXPRESSIONS: tuple[ColumnElement[Any], ...] = (NEXT_ATTEMPT,)


@dataclass(frozen=True)
class Fence:
    """Which claim may change a job: its id, and when given, the attempt number and the worker holding it."""

    job_id: str
    attempt: int | None = None
    worker_id: str | None = None
    route: Any = ANY_ROUTE  # only while the job is on this route (None: local)
    uncanceled: bool = False  # only while no cancel was asked (a completion: the caller then ends it canceled)


def transition_row(
    conn: Connection,
    fence: Fence,
    kind: EventKind,
    expect: list[Status],
    values: Values,
    payload: dict[str, Any],
    lease_before: float | None,
    rules: Mapping[str, WebhookRules],
) -> Job | None:
    route = "any" if fence.route is ANY_ROUTE else "local" if fence.route is None else "one"
    lease = lease_before is not None
    shape: Shape = (fence.attempt is not None, fence.worker_id is not None, route, lease, len(expect), fence.uncanceled)
    params: dict[str, Any] = {"f_id": fence.job_id, "f_attempt": fence.attempt, "f_worker": fence.worker_id}
    params |= {"f_route": fence.route, "f_lease": lease_before}
    params |= {f"f_status{i}": s.value for i, s in enumerate(expect)}
    if callable(values):  # computed from the row as it is inside this transaction
        row = conn.execute(_select(shape), params).first()
        if row is None:
            return None
        values = values(to_job(row))
    sets = tuple((k, _EXPRESSIONS.index(v) if isinstance(v, ColumnElement) else None) for k, v in values.items())
    params |= {f"v_{k}": v for k, v in values.items() if not isinstance(v, ColumnElement)}
    # The changed row comes back from the update itself (RETURNING): no second statement to read it.
    row = send(conn, _update(shape, sets), params, row=True)
    if row is None:
        return None
    job = to_job(row)
    if kind.is_ending and kind is not EventKind.SUCCEEDED:
        give_back(conn, job)  # exactly once: only the one transition that ended it gets here
    append_event(conn, job, kind, payload, rules)
    return job


Shape = tuple[bool, bool, str, bool, int, bool]


def _where(shape: Shape) -> ColumnElement[bool]:
    attempt, worker, route, lease, statuses, uncanceled = shape
    cond = [jobs.c.id == bindparam("f_id"), jobs.c.status.in_([bindparam(f"f_status{i}") for i in range(statuses)])]
    if attempt:
        cond.append(jobs.c.attempts == bindparam("f_attempt"))
    if worker:
        cond.append(jobs.c.worker_id == bindparam("f_worker"))
    if route != "any":
        cond.append(jobs.c.route.is_(None) if route == "local" else jobs.c.route == bindparam("f_route"))
    if lease:  # only if the lease is still expired (its worker may have renewed it)
        cond.append(jobs.c.lease_expires_at < bindparam("f_lease"))
    if uncanceled:
        cond.append(jobs.c.cancel_requested.is_(False))
    return and_(*cond)


@functools.lru_cache(maxsize=256)
def _select(shape: Shape) -> Select[Any]:
    return select(jobs).where(_where(shape))


@functools.lru_cache(maxsize=256)
def _update(shape: Shape, sets: tuple[tuple[str, int | None], ...]) -> Update:
    values = {k: bindparam(f"v_{k}") if i is None else _EXPRESSIONS[i] for k, i in sets}
    return update(jobs).where(_where(shape)).values(**values).returning(*jobs.c)
