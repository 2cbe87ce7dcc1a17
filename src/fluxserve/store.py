"""SQLAlchemy Core tables and queries. Only JobService calls the methods that change a job.

SQLite (WAL) by default, any SQLAlchemy URL otherwise. Every database error surfaces as
StoreUnavailable, which callers retry (workers) or answer as 503 (the API).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .errors import StoreUnavailable
from .job import WEBHOOK_EVENTS, EventKind, Job, JobEvent, Output, Status
from .limits import Limits, Usage, admit, day_start
from .spec import GenerationSpec

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("owner", String(64), nullable=False, index=True),
    Column("dialect", String(16), nullable=False),
    Column("model", String(64), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("spec", Text, nullable=False),
    Column("request", Text, nullable=False),
    Column("created_at", Float, nullable=False, index=True),
    Column("started_at", Float),
    Column("completed_at", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("progress_done", Integer, nullable=False, default=0),
    Column("progress_total", Integer, nullable=False, default=0),
    Column("outputs", Text, nullable=False, default="[]"),
    Column("error", Text),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("deadline", Float),
    Column("webhook", Text),
    Column("idempotency_key", String(255)),
    Column("fingerprint", String(64)),
    Column("previews", Text, nullable=False, default="[]"),
    Column("worker_id", String(128)),
    Column("lease_expires_at", Float),
    Column("images", Integer),  # images asked for (per-key daily limits, usage, metrics)
    Column("megapixels", Float),  # images x width x height / 1e6
    Column("files_expired_at", Float),  # outputs, inputs and previews deleted (retention)
    Column("encode_s", Float),  # seconds spent encoding and storing its images (metrics)
    Column("pc_job_id", BigInteger),  # its procrastinate queue row (PostgreSQL); NULL on SQLite
    UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
    # Per-key limits (fluxserve.limits): NULL takes the server's default, 0 means none.
    Column("max_queued", Integer),
    Column("rpm", Integer),
    Column("images_per_day", Integer),
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("kind", String(24), nullable=False),
    Column("payload", Text, nullable=False, default="{}"),
    Column("at", Float, nullable=False),
    Index("ix_job_events_job_id_id", "job_id", "id"),
)

# The webhook outbox: one row per delivery, written with the transition that causes it.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("msg_id", String(40), nullable=False, unique=True),  # webhook-id, the same on every try
    Column("job_id", String(32), nullable=False, index=True),
    Column("event", String(16), nullable=False),
    Column("receiver", String(300), nullable=False),  # scheme://host:port: the unit of per-receiver limits
    Column("state", String(12), nullable=False),  # pending, delivered, failed
    Column("body", Text),  # rendered at the first try, then sent unchanged
    Column("attempts", Integer, nullable=False, default=0),
    Column("due_at", Float, nullable=False),
    Column("claimed_until", Float),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Index("ix_webhook_deliveries_state_due", "state", "due_at"),
)

# One secret for every node: signs file URLs and derives webhook secrets.
server_secrets = Table(
    "server_secrets",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
)

# GPU workers as seen through the database (/health on any node lists them).
workers = Table(
    "fluxserve_workers",
    metadata,
    Column("id", String(160), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("device", String(64), nullable=False),
    Column("models", Text, nullable=False),  # JSON list
    Column("state", String(16), nullable=False),
    Column("error", Text),
    Column("current_job", String(32)),
    Column("started_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)

Values = dict[str, Any] | Callable[[Job], dict[str, Any]]


class QueueHooks(Protocol):
    """What the store asks of the PostgreSQL queue (fluxserve.queue.pg), inside its own transactions."""

    def deferred(self, conn: Connection, job: Job) -> None: ...
    def cancel(self, conn: Connection, job_id: str) -> None: ...
    def position(self, conn: Connection, job_id: str) -> int | None: ...


@dataclass(frozen=True)
class Fence:
    """Which claim may change a job: its id, and when given, the attempt number and the worker holding it."""

    job_id: str
    attempt: int | None = None
    worker_id: str | None = None


class _NoLock:
    """Servers with row locks (PostgreSQL) need no process-wide write lock."""

    def acquire(self, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass


BUSY_S = 5.0  # how long a write waits for a locked database before it is StoreUnavailable
THROTTLE_S = 0.5  # Replicate sends logs and output events at most this often per job


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    # Writers in this process queue on a lock (below); this only waits for other processes.
    cur.execute(f"PRAGMA busy_timeout={int(BUSY_S * 1000)}")
    cur.close()


def _fair_queue(models: Collection[str] | None) -> Any:
    """Queued jobs with their turn: the job's place among its owner's queued jobs plus the owner's
    running ones. Ordered by turn, then age, keys take turns: a key that floods the queue delays
    another key's job by about one job per busy worker, and positions come from the same order.
    One SQL query (window function), so it holds with any number of API nodes and workers."""
    running = (
        select(jobs.c.owner, func.count().label("n"))
        .where(jobs.c.status == Status.PROCESSING.value)
        .group_by(jobs.c.owner)
        .subquery()
    )
    place = func.row_number().over(partition_by=jobs.c.owner, order_by=(jobs.c.created_at, jobs.c.id))
    query = (
        select(
            jobs.c.id,
            jobs.c.model,
            jobs.c.spec,
            jobs.c.created_at,
            (place + func.coalesce(running.c.n, 0)).label("turn"),
        )
        .select_from(jobs.outerjoin(running, running.c.owner == jobs.c.owner))
        .where(jobs.c.status == Status.QUEUED.value)
    )
    if models is not None:
        query = query.where(jobs.c.model.in_(list(models)))
    return query.subquery()


def _fair_order(q: Any) -> tuple[Any, ...]:
    return (q.c.turn, q.c.created_at, q.c.id)


def _private_file(path: Path) -> None:
    """The database holds key hashes and webhook secrets: owner-only (SQLite gives its -wal and -shm
    files the main file's mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(path, 0o600)


# Connections one process holds on a database server (SQLite has none): POOL_SIZE kept, POOL_OVERFLOW more
# at busy moments; threads beyond that wait for one. README "Beyond one machine" adds them up per node.
POOL_SIZE = 5
POOL_OVERFLOW = 5
POOL_WAIT_S = 10.0  # a thread that waits longer for a connection gets StoreUnavailable (503), not a hang


def application_name(role: str) -> str:
    """How this process's connections show in pg_stat_activity: the role and the pid."""
    return f"fluxserve-{role}:{os.getpid()}"


class Store:
    def __init__(self, url: str, *, role: str = "api", pool_size: int = POOL_SIZE,
                 pool_overflow: int = POOL_OVERFLOW) -> None:  # fmt: skip
        self.url = url
        self.role = role
        self.is_sqlite = url.startswith("sqlite")
        if url.startswith("sqlite:///"):
            _private_file(Path(url.removeprefix("sqlite:///")))
            self.engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": BUSY_S}, pool_size=20, max_overflow=20
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(
                url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_overflow, pool_timeout=POOL_WAIT_S,
                connect_args={"application_name": application_name(role)},
            )  # fmt: skip
        # SQLite has one writer: threads of this process take turns here instead of in SQLite's
        # busy handler, which sleeps in steps of up to 100 ms.
        self._write_lock = threading.Lock() if self.is_sqlite else _NoLock()
        # Set on PostgreSQL when procrastinate dispatches the jobs (fluxserve.queue.pg).
        self.queue: QueueHooks | None = None

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        # Bounded like SQLite's own busy wait, so a write queued behind one stuck on a locked file
        # gives up after BUSY_S too rather than after twice that.
        if not self._write_lock.acquire(timeout=BUSY_S):
            raise StoreUnavailable(f"The database is unavailable: database is locked (waited {BUSY_S:g} s)")
        try:
            with self.engine.begin() as conn:
                yield conn
        except IntegrityError:
            raise
        except DBAPIError as exc:
            raise StoreUnavailable(f"The database is unavailable: {_reason(exc)}") from exc
        except PoolTimeout as exc:
            raise StoreUnavailable(f"The database is busy: no connection free within {POOL_WAIT_S:g} s") from exc
        finally:
            self._write_lock.release()

    def transaction(self) -> contextlib.AbstractContextManager[Connection]:
        """A write transaction for the queue's own statements (fluxserve.queue.pg)."""
        return self._write()

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except DBAPIError as exc:
            raise StoreUnavailable(f"The database is unavailable: {_reason(exc)}") from exc
        except PoolTimeout as exc:
            raise StoreUnavailable(f"The database is busy: no connection free within {POOL_WAIT_S:g} s") from exc

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute(select(1))

    # jobs: reads ----------------------------------------------------------

    def get_job(self, job_id: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return _to_job(row) if row else None

    def find_idempotent(self, owner: str, key: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(select(jobs).where(and_(jobs.c.owner == owner, jobs.c.idempotency_key == key))).first()
        return _to_job(row) if row else None

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
            return [_to_job(row) for row in conn.execute(query)]

    def queue_depth(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).where(jobs.c.status == Status.QUEUED.value)).scalar_one())

    def queue_position(self, job: Job) -> int:
        """1 = next to run, in the order workers claim (``_fair_queue``, or procrastinate's fetch order)."""
        q = _fair_queue(None)
        with self._read() as conn:
            if self.queue is not None:
                return self.queue.position(conn, job.id) or 1
            mine = conn.execute(select(q.c.turn, q.c.created_at).where(q.c.id == job.id)).first()
            if mine is None:
                return 1  # claimed or ended since it was read
            ahead = conn.execute(
                select(func.count()).where(
                    or_(
                        q.c.turn < mine.turn,
                        and_(q.c.turn == mine.turn, q.c.created_at < mine.created_at),
                        and_(q.c.turn == mine.turn, q.c.created_at == mine.created_at, q.c.id < job.id),
                    )
                )
            ).scalar_one()
        return int(ahead) + 1

    def is_cancel_requested(self, job_id: str) -> bool:
        with self._read() as conn:
            return bool(conn.execute(select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar())

    def last_event_id(self, job_id: str) -> int:
        with self._read() as conn:
            value = conn.execute(select(func.max(job_events.c.id)).where(job_events.c.job_id == job_id)).scalar()
        return int(value or 0)

    def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        with self._read() as conn:
            rows = conn.execute(
                select(job_events)
                .where(and_(job_events.c.job_id == job_id, job_events.c.id > after))
                .order_by(job_events.c.id)
            ).all()
        return [JobEvent(r.id, r.job_id, r.attempt, EventKind(r.kind), json.loads(r.payload), r.at) for r in rows]

    def expired_leases(self, now: float) -> list[Job]:
        with self._read() as conn:
            rows = conn.execute(
                select(jobs).where(and_(jobs.c.status == Status.PROCESSING.value, jobs.c.lease_expires_at < now))
            ).all()
        return [_to_job(r) for r in rows]

    def past_deadline(self, now: float) -> list[Job]:
        with self._read() as conn:
            rows = conn.execute(
                select(jobs).where(
                    and_(jobs.c.status == Status.QUEUED.value, jobs.c.deadline.is_not(None), jobs.c.deadline <= now)
                )
            ).all()
        return [_to_job(r) for r in rows]

    def queued(self, limit: int, models: Collection[str] | None = None) -> list[tuple[str, str, GenerationSpec]]:
        """(id, model, spec) of the next queued jobs in fair order: what a worker needs to choose, without rows."""
        q = _fair_queue(models)
        with self._read() as conn:
            rows = conn.execute(select(q.c.id, q.c.model, q.c.spec).order_by(*_fair_order(q)).limit(limit)).all()
        return [(r.id, r.model, GenerationSpec.from_dict(json.loads(r.spec))) for r in rows]

    # jobs: writes (JobService only) ----------------------------------------

    def insert_job(self, job: Job, limits: Limits | None = None) -> dict[str, str] | None:
        """The job inserted: its rate-limit headers (RateLimited past a limit), or None when another
        job already holds this owner's idempotency key. Limits are counted in the same transaction."""
        try:
            with self._write() as conn:
                headers = {}
                if limits is not None:
                    effective = limits.over(self._key_limits(conn, job.owner))
                    if effective.any:
                        usage = self._usage(conn, job.owner, job.created_at)
                        headers = admit(effective, usage, job.spec.num_images, job.created_at)
                conn.execute(jobs.insert().values(**_job_row(job)))
                _append_event(conn, job, EventKind.SUBMITTED, {})
                if self.queue is not None:  # its queue entry commits with it, or neither does
                    self.queue.deferred(conn, job)
        except IntegrityError:
            if job.idempotency_key is None:
                raise
            return None
        return headers

    @staticmethod
    def _key_limits(conn: Connection, owner: str) -> Limits:
        row = conn.execute(
            select(api_keys.c.max_queued, api_keys.c.rpm, api_keys.c.images_per_day).where(api_keys.c.id == owner)
        ).first()
        return Limits(row.max_queued, row.rpm, row.images_per_day) if row else Limits()

    @staticmethod
    def _usage(conn: Connection, owner: str, now: float) -> Usage:
        mine = jobs.c.owner == owner
        active = select(func.count()).where(
            and_(mine, jobs.c.status.in_([Status.QUEUED.value, Status.PROCESSING.value]))
        )
        minute = select(func.count(), func.min(jobs.c.created_at)).where(and_(mine, jobs.c.created_at >= now - 60))
        today = select(func.coalesce(func.sum(func.coalesce(jobs.c.images, 1)), 0)).where(
            and_(mine, jobs.c.created_at >= day_start(now))
        )
        in_minute, oldest = conn.execute(minute).one()
        return Usage(
            int(conn.execute(active).scalar_one()), int(in_minute), oldest, int(conn.execute(today).scalar_one())
        )

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
    ) -> Job | None:
        """Change one job if it is still in an expected status (and, when given, the same claim).

        The event row and any webhook deliveries are written in the same transaction. None: refused.
        """
        fence = Fence(job_id, attempt, worker_id)
        with self._write() as conn:
            job = _transition(conn, fence, kind, list(expect), values, payload or {}, lease_before)
            if job is not None and kind is EventKind.ABORTED and self.queue is not None:
                self.queue.cancel(conn, job_id)  # past its Cancel-After while queued: no worker fetches it
            return job

    def transition_many(
        self, fences: list[Fence], kind: EventKind, *, expect: Iterable[Status], values: Values,
        payload: dict[str, Any] | None = None,
    ) -> list[Job | None]:  # fmt: skip
        """The same transition for several jobs (a batch) in one transaction."""
        statuses = list(expect)
        with self._write() as conn:
            return [_transition(conn, f, kind, statuses, values, payload or {}, None) for f in fences]

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
            job = _to_job(conn.execute(select(jobs).where(jobs.c.id == job_id)).one())
            _append_event(conn, job, EventKind.CANCELED if canceled else EventKind.CANCEL_REQUESTED, {})
            if self.queue is not None:
                self.queue.cancel(conn, job_id)
        return job

    def claim(
        self, job_ids: list[str], worker_id: str, lease_s: float, *, first_only: bool,
        lock: Callable[[Connection, list[str]], list[str]] | None = None,
    ) -> list[Job]:  # fmt: skip
        """Claim these queued jobs in order, in one transaction: the first that is still queued, or all that are.

        ``lock`` narrows the ids inside the transaction first (the queue's rows, ``SKIP LOCKED``)."""
        now = time.time()
        values = {
            "status": Status.PROCESSING.value,
            "attempts": jobs.c.attempts + 1,
            "started_at": now,
            "progress_done": 0,
            "worker_id": worker_id,
            "lease_expires_at": now + lease_s,
        }
        claimed: list[Job] = []
        with self._write() as conn:
            if lock is not None:
                job_ids = lock(conn, job_ids)
            for job_id in job_ids:
                fence = Fence(job_id, None, None)
                job = _transition(conn, fence, EventKind.STARTED, [Status.QUEUED], values, {"worker": worker_id}, None)
                if job is not None:
                    claimed.append(job)
                    if first_only:
                        break
        return claimed

    def renew(self, job_ids: list[str], worker_id: str, lease_s: float) -> set[str]:
        """Extend the leases this worker still holds; returns the ids it holds."""
        if not job_ids:
            return set()
        held = and_(jobs.c.id.in_(job_ids), jobs.c.worker_id == worker_id, jobs.c.status == Status.PROCESSING.value)
        with self._write() as conn:
            conn.execute(update(jobs).where(held).values(lease_expires_at=time.time() + lease_s))
            return {r.id for r in conn.execute(select(jobs.c.id).where(held))}

    # webhook outbox ---------------------------------------------------------

    def due_deliveries(self, now: float, limit: int) -> list[Row[Any]]:
        with self._read() as conn:
            return list(
                conn.execute(
                    select(webhook_deliveries)
                    .where(
                        and_(
                            webhook_deliveries.c.state == "pending",
                            webhook_deliveries.c.due_at <= now,
                            or_(webhook_deliveries.c.claimed_until.is_(None), webhook_deliveries.c.claimed_until < now),
                        )
                    )
                    .order_by(webhook_deliveries.c.due_at)
                    .limit(limit)
                )
            )

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

    # the shared secret ----------------------------------------------------------

    def shared_secret(self) -> bytes:
        """The one server secret of every node on this database, made by whichever node asks first."""
        query = select(server_secrets.c.value).where(server_secrets.c.name == "server")
        with self._read() as conn:
            value = conn.execute(query).scalar()
        if value is None:
            try:
                with self._write() as conn:
                    conn.execute(server_secrets.insert().values(name="server", value=secrets.token_hex(32),
                                                                created_at=time.time()))  # fmt: skip
            except IntegrityError:
                pass  # another node made it first: read theirs
            with self._read() as conn:
                value = conn.execute(query).scalar_one()
        return bytes.fromhex(value)

    # api keys ---------------------------------------------------------------

    def add_key(self, key_id: str, name: str, key_hash: str, prefix: str) -> None:
        with self._write() as conn:
            conn.execute(
                api_keys.insert().values(id=key_id, name=name, key_hash=key_hash, prefix=prefix, created_at=time.time())
            )

    def find_key(self, key_hash: str) -> Row[Any] | None:
        with self._read() as conn:
            return conn.execute(
                select(api_keys).where(and_(api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None)))
            ).first()

    def list_keys(self) -> list[Row[Any]]:
        with self._read() as conn:
            return list(conn.execute(select(api_keys).order_by(api_keys.c.created_at)))

    def count_keys(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(api_keys)).scalar_one())

    # retention ------------------------------------------------------------------

    def expirable(self, cutoff: float, limit: int) -> list[Job]:
        """Ended jobs whose files outlived the retention period and are not yet deleted."""
        ended = jobs.c.status.in_([s.value for s in Status if s.is_terminal])
        query = select(jobs).where(
            and_(
                ended,
                jobs.c.files_expired_at.is_(None),
                func.coalesce(jobs.c.completed_at, jobs.c.created_at) < cutoff,
            )
        )
        with self._read() as conn:
            return [_to_job(r) for r in conn.execute(query.order_by(jobs.c.created_at).limit(limit))]

    def mark_files_expired(self, job_id: str, now: float) -> bool:
        """Once per job whichever node swept it; its events and sent webhooks go with its files."""
        with self._write() as conn:
            done = conn.execute(
                update(jobs).where(and_(jobs.c.id == job_id, jobs.c.files_expired_at.is_(None)))
                .values(files_expired_at=now)
            ).rowcount  # fmt: skip
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

    def job_usage(self, since: float, owner: str | None = None) -> list[Row[Any]]:
        """The columns usage is computed from, for jobs created since then (one key's, or all)."""
        cols = [jobs.c[n] for n in ("owner", "model", "status", "created_at", "started_at", "completed_at")]
        query = select(*cols, jobs.c.images, jobs.c.megapixels).where(jobs.c.created_at >= since)
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

    def set_key_limits(self, id_or_name: str, limits: Limits) -> int:
        """Set the given limits (None leaves one as it is) on the active key(s) with this id or name."""
        values = {k: v for k, v in vars(limits).items() if v is not None}
        return self._update_active_key(id_or_name, values) if values else 0

    def revoke_key(self, id_or_name: str) -> int:
        return self._update_active_key(id_or_name, {"revoked_at": time.time()})

    def _update_active_key(self, id_or_name: str, values: dict[str, Any]) -> int:
        active = and_((api_keys.c.id == id_or_name) | (api_keys.c.name == id_or_name), api_keys.c.revoked_at.is_(None))
        with self._write() as conn:
            return conn.execute(update(api_keys).where(active).values(**values)).rowcount


def _transition(
    conn: Connection,
    fence: Fence,
    kind: EventKind,
    expect: list[Status],
    values: Values,
    payload: dict[str, Any],
    lease_before: float | None,
) -> Job | None:
    cond = [jobs.c.id == fence.job_id, jobs.c.status.in_([s.value for s in expect])]
    if fence.attempt is not None:
        cond.append(jobs.c.attempts == fence.attempt)
    if fence.worker_id is not None:
        cond.append(jobs.c.worker_id == fence.worker_id)
    if lease_before is not None:  # only if the lease is still expired (its worker may have renewed it)
        cond.append(jobs.c.lease_expires_at < lease_before)
    if callable(values):  # computed from the row as it is inside this transaction
        row = conn.execute(select(jobs).where(and_(*cond))).first()
        if row is None:
            return None
        values = values(_to_job(row))
    if conn.execute(update(jobs).where(and_(*cond)).values(**values)).rowcount != 1:
        return None
    job = _to_job(conn.execute(select(jobs).where(jobs.c.id == fence.job_id)).one())
    _append_event(conn, job, kind, payload)
    return job


def _reason(exc: DBAPIError) -> str:
    return str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__


NOTIFY_CHANNEL = "fluxserve_job"


def _append_event(conn: Connection, job: Job, kind: EventKind, payload: dict[str, Any]) -> None:
    now = time.time()
    conn.execute(
        job_events.insert().values(
            job_id=job.id, attempt=job.attempts, kind=kind.value, payload=json.dumps(payload), at=now
        )
    )
    if conn.dialect.name == "postgresql":  # delivered at commit: a listener that re-reads sees this row
        conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, f"{job.id}:{kind.value}")))
    if job.webhook:
        _enqueue_webhooks(conn, job, kind, now)


def _enqueue_webhooks(conn: Connection, job: Job, kind: EventKind, now: float) -> None:
    """The outbox rows this transition causes, in the caller's transaction.

    logs/output are throttled as Replicate does: while one is pending it will carry the newer state
    (bodies are rendered when first sent), and a new one is due no sooner than THROTTLE_S after the last.
    """
    assert job.webhook is not None
    wanted = job.webhook.get("events") or ()
    url = urlsplit(job.webhook["url"])
    receiver = f"{url.scheme}://{url.hostname}:{url.port or (443 if url.scheme == 'https' else 80)}"
    for name in WEBHOOK_EVENTS.get(kind, ()):
        if name not in wanted:
            continue
        due = now
        if name in ("logs", "output"):
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
                due = max(now, float(last) + THROTTLE_S)
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


def _job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "owner": job.owner,
        "dialect": job.dialect,
        "model": job.spec.model,
        "status": job.status.value,
        "spec": json.dumps(job.spec.to_dict()),
        "request": json.dumps(job.request),
        "created_at": job.created_at,
        "attempts": 0,
        "progress_done": 0,
        "progress_total": job.spec.steps,
        "outputs": "[]",
        "cancel_requested": False,
        "deadline": job.deadline,
        "webhook": json.dumps(job.webhook) if job.webhook else None,
        "idempotency_key": job.idempotency_key,
        "fingerprint": job.fingerprint,
        "previews": "[]",
        "images": job.spec.num_images,
        "megapixels": job.spec.num_images * job.spec.width * job.spec.height / 1e6,
    }


def outputs_json(outputs: list[Output]) -> str:
    return json.dumps([o.__dict__ for o in outputs])


def _to_job(row: Row[Any]) -> Job:
    return Job(
        id=row.id,
        owner=row.owner,
        dialect=row.dialect,
        spec=GenerationSpec.from_dict(json.loads(row.spec)),
        request=json.loads(row.request),
        status=Status(row.status),
        created_at=row.created_at,
        started_at=row.started_at,
        completed_at=row.completed_at,
        attempts=row.attempts,
        worker_id=row.worker_id,
        lease_expires_at=row.lease_expires_at,
        cancel_requested=bool(row.cancel_requested),
        progress_done=row.progress_done,
        progress_total=row.progress_total,
        outputs=tuple(Output(**o) for o in json.loads(row.outputs)),
        error=row.error,
        deadline=row.deadline,
        webhook=json.loads(row.webhook) if row.webhook else None,
        idempotency_key=row.idempotency_key,
        fingerprint=row.fingerprint,
        previews=tuple(json.loads(row.previews or "[]")),
        files_expired_at=row.files_expired_at,
    )
