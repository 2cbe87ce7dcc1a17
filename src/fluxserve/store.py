"""SQLAlchemy Core tables and queries. SQLite (WAL) by default, any SQLAlchemy URL otherwise."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
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
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import IntegrityError

from .jobs import Job, Output, Status
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
)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class Store:
    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        metadata.create_all(self.engine)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Databases made by an older fluxserve get the columns added since (nullable or defaulted)."""
        have = {c["name"] for c in inspect(self.engine).get_columns("jobs")}
        with self.engine.begin() as conn:
            for col in jobs.columns:
                if col.name not in have:
                    ddl = col.type.compile(dialect=self.engine.dialect)
                    default = " NOT NULL DEFAULT '[]'" if col.name == "previews" else ""
                    conn.execute(text(f"ALTER TABLE jobs ADD COLUMN {col.name} {ddl}{default}"))

    def close(self) -> None:
        self.engine.dispose()

    # jobs -----------------------------------------------------------------

    def insert_job(self, job: Job) -> bool:
        """False when another job already holds this owner's idempotency key."""
        try:
            with self.engine.begin() as conn:
                self._insert(conn, job)
        except IntegrityError:
            if job.idempotency_key is None:
                raise
            return False
        return True

    def _insert(self, conn: Any, job: Job) -> None:
        conn.execute(
            jobs.insert().values(
                id=job.id,
                owner=job.owner,
                dialect=job.dialect,
                model=job.spec.model,
                status=job.status.value,
                spec=json.dumps(job.spec.to_dict()),
                request=json.dumps(job.request),
                created_at=job.created_at,
                attempts=0,
                progress_done=0,
                progress_total=job.spec.steps,
                outputs="[]",
                cancel_requested=False,
                deadline=job.deadline,
                webhook=json.dumps(job.webhook) if job.webhook else None,
                idempotency_key=job.idempotency_key,
                fingerprint=job.fingerprint,
                previews="[]",
            )
        )

    def find_idempotent(self, owner: str, key: str) -> Job | None:
        with self.engine.connect() as conn:
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
        with self.engine.connect() as conn:
            return [_to_job(row) for row in conn.execute(query)]

    def add_preview(self, job_id: str, key: str) -> None:
        with self.engine.begin() as conn:
            current = conn.execute(select(jobs.c.previews).where(jobs.c.id == job_id)).scalar_one()
            conn.execute(
                update(jobs).where(jobs.c.id == job_id).values(previews=json.dumps([*json.loads(current), key]))
            )

    def abort_expired(self, now: float) -> list[str]:
        """Queued jobs whose Cancel-After deadline passed never start."""
        expired = and_(jobs.c.status == Status.QUEUED.value, jobs.c.deadline.is_not(None), jobs.c.deadline <= now)
        with self.engine.begin() as conn:
            ids = [r.id for r in conn.execute(select(jobs.c.id).where(expired))]
            if ids:
                conn.execute(
                    update(jobs)
                    .where(and_(expired, jobs.c.id.in_(ids)))
                    .values(
                        status=Status.ABORTED.value,
                        completed_at=now,
                        error="The Cancel-After deadline passed before the job started.",
                    )
                )
        return ids

    def get_job(self, job_id: str) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return _to_job(row) if row else None

    def claim_next(self) -> Job | None:
        """Atomically move the oldest queued job to processing and count the attempt."""
        with self.engine.begin() as conn:
            while True:
                row = conn.execute(
                    select(jobs.c.id).where(jobs.c.status == Status.QUEUED.value).order_by(jobs.c.created_at).limit(1)
                ).first()
                if row is None:
                    return None
                claimed = conn.execute(
                    update(jobs)
                    .where(and_(jobs.c.id == row.id, jobs.c.status == Status.QUEUED.value))
                    .values(
                        status=Status.PROCESSING.value,
                        attempts=jobs.c.attempts + 1,
                        started_at=time.time(),
                        progress_done=0,
                    )
                )
                if claimed.rowcount == 1:
                    full = conn.execute(select(jobs).where(jobs.c.id == row.id)).one()
                    return _to_job(full)

    def claim_compatible(self, first: Job, max_images: int) -> list[Job]:
        """Claim queued jobs that can share ``first``'s pipeline call, oldest first, up to max_images in all."""
        key = first.spec.batch_key()
        budget = max_images - first.spec.num_images
        claimed: list[Job] = []
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(jobs)
                .where(and_(jobs.c.status == Status.QUEUED.value, jobs.c.model == first.spec.model))
                .order_by(jobs.c.created_at)
                .limit(64)
            ).all()
            for row in rows:
                job = _to_job(row)
                if budget <= 0:
                    break
                if job.spec.batch_key() != key or job.spec.num_images > budget:
                    continue
                won = conn.execute(
                    update(jobs)
                    .where(and_(jobs.c.id == job.id, jobs.c.status == Status.QUEUED.value))
                    .values(status=Status.PROCESSING.value, attempts=jobs.c.attempts + 1, started_at=time.time())
                ).rowcount
                if won:
                    budget -= job.spec.num_images
                    claimed.append(job)
        return claimed

    def update_progress(self, job_id: str, done: int, total: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(progress_done=done, progress_total=total))

    def finish(
        self, job_id: str, status: Status, *, outputs: list[Output] | None = None, error: str | None = None
    ) -> None:
        values: dict[str, Any] = {"status": status.value, "completed_at": time.time(), "error": error}
        if outputs is not None:
            values["outputs"] = json.dumps([o.__dict__ for o in outputs])
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))

    def requeue(self, job_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(and_(jobs.c.id == job_id, jobs.c.status == Status.PROCESSING.value))
                .values(status=Status.QUEUED.value, attempts=jobs.c.attempts - 1, progress_done=0)
            )

    def request_cancel(self, job_id: str) -> None:
        """A queued job is canceled at once; a running one when the worker next checks."""
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(cancel_requested=True))
            conn.execute(
                update(jobs)
                .where(and_(jobs.c.id == job_id, jobs.c.status == Status.QUEUED.value))
                .values(status=Status.CANCELED.value, completed_at=time.time())
            )

    def is_cancel_requested(self, job_id: str) -> bool:
        with self.engine.connect() as conn:
            return bool(conn.execute(select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar())

    def recover_interrupted(self, max_attempts: int) -> tuple[int, int]:
        """Jobs left processing by a dead process: re-queue them, or fail them past max_attempts."""
        with self.engine.begin() as conn:
            processing = and_(jobs.c.status == Status.PROCESSING.value)
            failed = conn.execute(
                update(jobs)
                .where(and_(processing, jobs.c.attempts >= max_attempts))
                .values(
                    status=Status.FAILED.value,
                    completed_at=time.time(),
                    error=f"The server stopped while this job was running, {max_attempts} times; giving up.",
                )
            ).rowcount
            requeued = conn.execute(
                update(jobs).where(processing).values(status=Status.QUEUED.value, progress_done=0)
            ).rowcount
        return requeued, failed

    def queue_depth(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).where(jobs.c.status == Status.QUEUED.value)).scalar_one())

    def queue_position(self, job: Job) -> int:
        """1 = next to run."""
        with self.engine.connect() as conn:
            ahead = conn.execute(
                select(func.count()).where(
                    and_(jobs.c.status == Status.QUEUED.value, jobs.c.created_at < job.created_at)
                )
            ).scalar_one()
        return int(ahead) + 1

    # api keys ---------------------------------------------------------------

    def add_key(self, key_id: str, name: str, key_hash: str, prefix: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                api_keys.insert().values(id=key_id, name=name, key_hash=key_hash, prefix=prefix, created_at=time.time())
            )

    def find_key(self, key_hash: str) -> Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(api_keys).where(and_(api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None)))
            ).first()

    def list_keys(self) -> list[Row[Any]]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(api_keys).order_by(api_keys.c.created_at)))

    def count_keys(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(api_keys)).scalar_one())

    def revoke_key(self, id_or_name: str) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                update(api_keys)
                .where(
                    and_(
                        (api_keys.c.id == id_or_name) | (api_keys.c.name == id_or_name), api_keys.c.revoked_at.is_(None)
                    )
                )
                .values(revoked_at=time.time())
            ).rowcount


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
        progress_done=row.progress_done,
        progress_total=row.progress_total,
        outputs=tuple(Output(**o) for o in json.loads(row.outputs)),
        error=row.error,
        deadline=row.deadline,
        webhook=json.loads(row.webhook) if row.webhook else None,
        idempotency_key=row.idempotency_key,
        fingerprint=row.fingerprint,
        previews=tuple(json.loads(row.previews or "[]")),
    )
