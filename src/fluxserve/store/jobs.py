"""The jobs table: reads, and the fenced writes only JobService makes."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import Select

from ..job import EventKind, Job, Status
from ..spec import GenerationSpec
from .credits import give_back, reprice
from .db import Database, clock, send
from .events import append_event
from .fairness import fetch_order
from .outbox import WebhookRules
from .rows import job_row, to_job
from .schema import job_events, jobs
from .transition import ANY_ROUTE, NEXT_ATTEMPT, Fence, Values, transition_row

ADMIT_LOCK = 0x6B657973  # "keys": the advisory lock space of per-key admission (with the key's hash)
# Run inside the insert's transaction before the row is written: a per-key admission that may refuse
# (RateLimited) and returns the response's rate-limit headers.


class JobQueries(Database):
    queue: Any  # store.hooks.QueueHooks, set by Store
    webhook_rules: Mapping[str, WebhookRules]
    job_reads: tuple[str, str]  # get_job's SQL without and with the position (job_reads()), set by Store

    def get_job(self, job_id: str, *, with_position: bool = False) -> Job | None:
        """``with_position``: a queued job's queue_position too, in the same statement. Every poll is this read:
        its SQL is written once per store and sent as is (SQLAlchemy's statement building and caching cost
        more than the query: 276 against 107 us per poll on SQLite, bench/api_edge.py)."""
        sql = self.job_reads[with_position]
        with self._read() as conn:
            row = conn.exec_driver_sql(sql, {"id": job_id}).first()
        if row is None:
            return None
        job = to_job(row)
        if with_position and job.status is Status.QUEUED:
            job = replace(job, queue_position=row.queue_position or 1)
        return job

    def find_idempotent(self, owner: str, key: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(select(jobs).where(and_(jobs.c.owner == owner, jobs.c.idempotency_key == key))).first()
        return to_job(row) if row else None

    def find_by_mark(self, owner: str | None, mark: str) -> Job | None:
        """The job whose images carry this watermark mark (provenance): the key's (``owner``), or anyone's."""
        query = select(jobs).where(jobs.c.mark == mark)
        with self._read() as conn:
            row = conn.execute(query if owner is None else query.where(jobs.c.owner == owner)).first()
        return to_job(row) if row else None

    def list_jobs(self, owner: str, dialect: str, *, before: tuple[float, str] | None, limit: int) -> list[Job]:
        """Newest first; ``before`` is the (created_at, id) of the last row of the previous page."""
        query = select(jobs).where(and_(jobs.c.owner == owner, jobs.c.dialect == dialect))
        if before is not None:
            created, job_id = before
            query = query.where(
                (jobs.c.created_at < created) | (and_(jobs.c.created_at == created, jobs.c.id < job_id))
            )
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        with self._read() as conn:
            return [to_job(row) for row in conn.execute(query)]

    def is_cancel_requested(self, job_id: str) -> bool:
        with self._read() as conn:
            return bool(conn.execute(_CANCEL_REQUESTED, {"job": job_id}).scalar())

    def expired_leases(self, now: float) -> list[Job]:
        with self._read() as conn:
            return [to_job(r) for r in conn.execute(_EXPIRED_LEASES, {"now": now})]

    def past_deadline(self, now: float) -> list[Job]:
        with self._read() as conn:
            return [to_job(r) for r in conn.execute(_PAST_DEADLINE, {"now": now})]

    def spillable(self, model: str, queued_before: float, limit: int = 100) -> list[str]:
        """Local jobs of this model queued since before ``queued_before`` (no local worker started them) that an
        upstream can honour (no LoRA adapters: no provider takes ours) and that were never routed (one that
        came back from an upstream stays here)."""
        routed = select(job_events.c.id).where(
            and_(job_events.c.job_id == jobs.c.id, job_events.c.kind == EventKind.ROUTED.value)
        )
        query = select(jobs.c.id, jobs.c.spec).where(
            and_(
                jobs.c.model == model,
                jobs.c.status == Status.QUEUED.value,
                jobs.c.route.is_(None),
                jobs.c.created_at < queued_before,
                ~routed.exists(),
            )
        )
        with self._read() as conn:
            rows = conn.execute(query.order_by(jobs.c.created_at).limit(limit)).all()
        return [r.id for r in rows if not GenerationSpec.from_dict(json.loads(r.spec)).loras]

    def queue_position(self, job: Job) -> int:
        """1 = next to run, in the order the queue fetches (store.fairness)."""
        with self._read() as conn:
            return self.queue.position(conn, job.id) or 1

    def queued(
        self, limit: int, models: Collection[str] | None = None, *, route: str | Any | None = ANY_ROUTE
    ) -> list[tuple[str, str, GenerationSpec, float]]:
        """(id, model, spec, created_at) of the next queued jobs in fair order: what a worker needs to choose,
        without rows.

        ``route``: only jobs routed to this upstream (None: the local devices' jobs)."""
        routed = "any" if route is ANY_ROUTE else "local" if route is None else "one"
        params = {"limit": limit, "models": list(models or ()), "route": route}
        with self._read() as conn:  # every slot that wakes asks this: its statement is built once per shape
            rows = conn.execute(_queued(models is not None, routed), params).all()
        return [(r.id, r.model, GenerationSpec.from_dict(json.loads(r.spec)), r.created_at) for r in rows]

    # writes (JobService only) ---------------------------------------------------

    def transition(
        self,
        job_id: str,
        kind: EventKind,
        *,
        expect: Iterable[Status],
        values: Values,
        attempt: int | None = None,
        worker_id: str | None = None,
        payload: dict[str, Any] | None = None,
        lease_before: float | None = None,
        route: Any = ANY_ROUTE,
        price: Callable[[Job], float | None] | None = None,
        then: Callable[[Connection, Job], None] | None = None,
        uncanceled: bool = False,
    ) -> Job | None:
        """Change one job if it is still in an expected status (and, when given, the same claim or route;
        ``uncanceled``: no cancel asked).

        The event row and any webhook deliveries are written in the same transaction. None: refused.
        ``price``: a route change's price for the job where it goes; the difference with what it holds is
        held or given back in the same transaction (PaymentRequired: nothing changes). ``then``: more writes
        of the changed job's, in the same transaction (a success's licence usage).
        """
        fence = Fence(job_id, attempt, worker_id, route, uncanceled)
        with self._write() as conn:
            job = transition_row(
                conn, fence, kind, list(expect), values, payload or {}, lease_before, self.webhook_rules
            )
            if job is not None and price is not None:
                held = reprice(conn, job.owner, job.cost, price(job), job.route or "this server")
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(cost=held))
                job = replace(job, cost=held)
            if job is not None and kind is EventKind.ABORTED:
                self.queue.cancel(conn, job_id)  # past its Cancel-After while queued: no worker fetches it
            if job is not None and kind is EventKind.ROUTED:
                self.queue.rerouted(conn, job)  # its queue entry moves with it (PostgreSQL: the upstream's queue)
            if job is not None and then is not None:
                then(conn, job)
            return job

    def transition_many(
        self,
        fences: list[Fence],
        kind: EventKind,
        *,
        expect: Iterable[Status],
        values: Values,
        payload: dict[str, Any] | None = None,
    ) -> list[Job | None]:
        """The same transition for several jobs (a batch) in one transaction, their rows taken in id order (no
        deadlock with another multi-row write); the results in the order of ``fences``."""
        statuses = list(expect)
        with self._write() as conn:
            rules = self.webhook_rules
            done = {
                f.job_id: transition_row(conn, f, kind, statuses, values, payload or {}, None, rules)
                for f in sorted(fences, key=lambda f: f.job_id)
            }
            return [done[f.job_id] for f in fences]

    def request_cancel(self, job_id: str) -> Job | None:
        """Flag a job for cancellation; a queued one is canceled at once. None: it had already ended."""
        now = time.time()
        live = [Status.QUEUED.value, Status.PROCESSING.value]
        with self._write() as conn:
            flagged = conn.execute(
                update(jobs).where(and_(jobs.c.id == job_id, jobs.c.status.in_(live))).values(cancel_requested=True)
            ).rowcount
            if not flagged:
                return None
            canceled = conn.execute(
                update(jobs)
                .where(and_(jobs.c.id == job_id, jobs.c.status == Status.QUEUED.value))
                .values(status=Status.CANCELED.value, completed_at=now, error="canceled")
            ).rowcount
            job = to_job(conn.execute(select(jobs).where(jobs.c.id == job_id)).one())
            kind = EventKind.CANCELED if canceled else EventKind.CANCEL_REQUESTED
            if canceled:
                give_back(conn, job)
            append_event(conn, job, kind, {}, self.webhook_rules)
            self.queue.cancel(conn, job_id)
        return job

    def claim(
        self,
        job_ids: list[str],
        worker_id: str,
        lease_s: float,
        *,
        first_only: bool,
        lock: Callable[[Connection, list[str]], list[str]] | None = None,
    ) -> list[Job]:
        """Claim these queued jobs in order, in one transaction: the first that is still queued, or all that are.

        ``lock`` narrows the ids inside the transaction first (the queue's rows, ``SKIP LOCKED``)."""
        claimed: list[Job] = []
        rules = self.webhook_rules
        with self._write() as conn:
            now = clock(conn)
            values = {
                "status": Status.PROCESSING.value,
                "attempts": NEXT_ATTEMPT,
                "started_at": now,
                "progress_done": 0,
                "worker_id": worker_id,
                "lease_expires_at": now + lease_s,
            }
            if lock is not None:
                job_ids = lock(conn, job_ids)
            for job_id in job_ids:
                fence = Fence(job_id, None, None)
                started = {"worker": worker_id}
                job = transition_row(conn, fence, EventKind.STARTED, [Status.QUEUED], values, started, None, rules)
                if job is not None:
                    claimed.append(job)
                    if first_only:
                        break
        return claimed

    def renew(self, claims: list[tuple[str, int]], worker_id: str, lease_s: float) -> set[str]:
        """Extend the leases of these (job id, attempt) claims this worker still holds; returns their ids.

        Fenced by attempt: a stale claim's renewal never keeps a later claim of the same job alive."""
        if not claims:
            return set()
        mine = or_(*(and_(jobs.c.id == job_id, jobs.c.attempts == attempt) for job_id, attempt in claims))
        held = and_(mine, jobs.c.worker_id == worker_id, jobs.c.status == Status.PROCESSING.value)
        with self._write() as conn:
            # Rows locked in id order, as every multi-row write here takes them: a batch's renewal and its
            # progress (transition_many) deadlocked on PostgreSQL when each took the rows in its own order.
            ids = [r.id for r in conn.execute(select(jobs.c.id).where(held).order_by(jobs.c.id).with_for_update())]
            if ids:
                conn.execute(update(jobs).where(jobs.c.id.in_(ids)).values(lease_expires_at=clock(conn) + lease_s))
            return set(ids)


def job_reads(is_sqlite: bool, position_sql: str) -> tuple[str, str]:
    """get_job's statement, without and with the queue's position of the row (its hooks' ``position_sql``), in
    the driver's own parameter style: written once per store, sent as is."""
    where = "m.id = :id" if is_sqlite else "m.id = %(id)s"
    columns = ", ".join(f"m.{c.name}" for c in jobs.columns)
    head, tail = f"SELECT {columns}, ", f" AS queue_position FROM jobs m WHERE {where}"
    return head + "NULL" + tail, head + position_sql + tail


class DuplicateJob(Exception):
    """Another job already holds this owner's idempotency key (a concurrent create won the insert)."""


# The create's statements, and the sweeps' that run every second on every node, are built once: building one
# per call (coercing each value, a cache key over them) cost four times the statement's own run (239 against
# 52 us for the priority count here, issue 38).
_INSERT_JOB = jobs.insert()
_CANCEL_REQUESTED = select(jobs.c.cancel_requested).where(jobs.c.id == bindparam("job"))
_EXPIRED_LEASES = select(jobs).where(
    and_(jobs.c.status == Status.PROCESSING.value, jobs.c.lease_expires_at < bindparam("now"))
)
_PAST_DEADLINE = select(jobs).where(
    and_(jobs.c.status == Status.QUEUED.value, jobs.c.deadline.is_not(None), jobs.c.deadline <= bindparam("now"))
)
_ADMIT = select(func.pg_advisory_xact_lock(ADMIT_LOCK, func.hashtext(bindparam("owner"))))


def serialize_owner(conn: Connection, owner: str) -> None:
    """On PostgreSQL, one key's creates take turns until commit: its counts (queued, per minute, per day)
    are read and the new row written with no concurrent create between them. SQLite writes one at a time."""
    if conn.dialect.name == "postgresql":
        conn.execute(_ADMIT, {"owner": owner})


def insert_row(conn: Connection, job: Job, priority: int, queued: Mapping[str, Any]) -> None:
    """The job's row, with its fair priority (store.fairness) and what its queue entry gave it (``queued``: the
    hooks' ``deferred``), in the caller's transaction."""
    try:
        send(conn, _INSERT_JOB, {**job_row(job), "priority": priority, **queued})
    except IntegrityError as exc:
        if job.idempotency_key is None:
            raise
        raise DuplicateJob(job.idempotency_key) from exc


@functools.lru_cache(maxsize=8)
def _queued(by_model: bool, route: str) -> Select[Any]:
    query = select(jobs.c.id, jobs.c.model, jobs.c.spec, jobs.c.created_at).where(jobs.c.status == Status.QUEUED.value)
    if by_model:
        query = query.where(jobs.c.model.in_(bindparam("models", expanding=True)))
    if route != "any":
        query = query.where(jobs.c.route.is_(None) if route == "local" else jobs.c.route == bindparam("route"))
    return query.order_by(*fetch_order()).limit(bindparam("limit"))
