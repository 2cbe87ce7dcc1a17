"""Numbered schema migrations, applied by `fluxserve db upgrade` (and by `serve` on embedded SQLite).

A small table of numbered steps rather than Alembic: the schema is SQLAlchemy Core, every step so far
is additive, and the same code must run on SQLite and PostgreSQL without shipping an Alembic
environment in the wheel. Each step checks what exists, so a database made before versioning
(tables created by `create_all`, columns added ad hoc) upgrades to the same shape as a new one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, inspect, select, text
from sqlalchemy.engine import Connection, Engine

from . import store

_versions = MetaData()
schema_migrations = Table(
    "schema_migrations",
    _versions,
    Column("version", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("applied_at", Float, nullable=False),
)


def _add_missing_columns(conn: Connection, table: Table) -> None:
    have = {c["name"] for c in inspect(conn).get_columns(table.name)}
    for col in table.columns:
        if col.name in have:
            continue
        ddl = col.type.compile(dialect=conn.dialect)
        default = " NOT NULL DEFAULT '[]'" if col.name in ("previews", "outputs") else ""
        conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {col.name} {ddl}{default}"))


def _baseline(conn: Connection) -> None:
    store.metadata.create_all(conn, tables=[store.jobs, store.api_keys])
    _add_missing_columns(conn, store.jobs)


def _leases_events_outbox(conn: Connection) -> None:
    _add_missing_columns(conn, store.jobs)  # worker_id, lease_expires_at
    store.metadata.create_all(conn, tables=[store.job_events, store.webhook_deliveries])


def _key_limits(conn: Connection) -> None:
    _add_missing_columns(conn, store.jobs)  # images, megapixels
    _add_missing_columns(conn, store.api_keys)  # max_queued, rpm, images_per_day
    # Per-key counts (limits, usage) read a key's recent jobs.
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_jobs_owner_created_at ON jobs (owner, created_at)"))


def _retention(conn: Connection) -> None:
    _add_missing_columns(conn, store.jobs)  # files_expired_at, encode_s


def _scale_out(conn: Connection) -> None:
    _add_missing_columns(conn, store.jobs)  # pc_job_id: the job's procrastinate row (PostgreSQL)
    store.metadata.create_all(conn, tables=[store.server_secrets, store.workers])


def _fair_priority(conn: Connection) -> None:
    _add_missing_columns(conn, store.jobs)  # priority: the one fairness rule of both queues


def _upstreams_credits(conn: Connection) -> None:
    _add_missing_columns(conn, store.jobs)  # route, cost, error_code
    _add_missing_columns(conn, store.api_keys)  # credits


def _files(conn: Connection) -> None:
    store.metadata.create_all(conn, tables=[store.files])


def _notes_admin_keys(conn: Connection) -> None:
    _add_missing_columns(conn, store.jobs)  # note
    _add_missing_columns(conn, store.api_keys)  # admin


def _warm_workers(conn: Connection) -> None:
    _add_missing_columns(conn, store.workers)  # warm


def _job_retention(conn: Connection) -> None:
    _add_missing_columns(conn, store.jobs)  # retain_s


def _batches(conn: Connection) -> None:
    _add_missing_columns(conn, store.jobs)  # batch_id
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_jobs_batch_id ON jobs (batch_id)"))
    store.metadata.create_all(conn, tables=[store.batches])


def _owner_status(conn: Connection) -> None:
    # Each create counts its key's queued and running jobs (the fair priority, the limits): without this index
    # that count read every job the key ever made (13.7 ms at 50,000 of them on SQLite; 0.6 ms with it).
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_jobs_owner_status ON jobs (owner, status)"))


def _marks(conn: Connection) -> None:
    _add_missing_columns(conn, store.jobs)  # mark
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_jobs_mark ON jobs (mark)"))


def _licence_usage(conn: Connection) -> None:
    store.metadata.create_all(conn, tables=[store.licence_usage])


def _queue_order(conn: Connection) -> None:
    # A queued job's position (asked on every poll) counts the queued jobs ahead of it in the fetch order: over
    # this index, a range of entries; without it, every queued row read (0.4-0.6 ms at 2,300 queued on SQLite,
    # 0.13 ms with it). The expression is written as store.fairness writes it, so the planner matches them.
    conn.execute(
        text("CREATE INDEX IF NOT EXISTS ix_jobs_queue_order ON jobs (status, (coalesce(priority, 0)), created_at, id)")
    )


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "jobs and api keys", _baseline),
    (2, "worker leases, job events, webhook outbox", _leases_events_outbox),
    (3, "per-key limits, image counts", _key_limits),
    (4, "file retention, encoding time", _retention),
    (5, "queue rows, shared secret, worker registry", _scale_out),
    (6, "fair priority", _fair_priority),
    (7, "upstream routes, credits", _upstreams_credits),
    (8, "replicate files", _files),
    (9, "job notes, admin keys", _notes_admin_keys),
    (10, "warm models per worker", _warm_workers),
    (11, "per-job retention", _job_retention),
    (12, "batches", _batches),
    (13, "a key's active jobs by index", _owner_status),
    (14, "watermark marks", _marks),
    (15, "licence usage outbox", _licence_usage),
    (16, "the queue's order by index", _queue_order),
]
LATEST = MIGRATIONS[-1][0]


def current_version(engine: Engine) -> int:
    with engine.connect() as conn:
        if not inspect(conn).has_table(schema_migrations.name):
            return 0
        value = conn.execute(select(schema_migrations.c.version).order_by(schema_migrations.c.version.desc())).first()
    return int(value[0]) if value else 0


def upgrade(engine: Engine) -> list[str]:
    """Apply the missing steps, each in its own transaction; returns what was applied.

    On PostgreSQL, nodes that upgrade at once take turns on an advisory lock, and procrastinate's
    schema is applied too (once: its own apply is not idempotent)."""
    if engine.dialect.name != "postgresql":
        return _upgrade(engine)
    with engine.connect() as lock:
        lock.execute(text("SELECT pg_advisory_lock(:k)"), {"k": UPGRADE_LOCK})
        try:
            applied = _upgrade(engine)
            if apply_queue_schema(engine):
                applied.append("procrastinate 3.10 schema")
            return applied
        finally:
            lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": UPGRADE_LOCK})
            lock.commit()


def apply_queue_schema(engine: Engine) -> bool:
    """procrastinate's schema (the PostgreSQL queue's tables), once: its apply is not idempotent.
    Called under the upgrade lock."""
    from procrastinate.schema import SchemaManager

    with engine.begin() as conn:
        if conn.execute(text("SELECT to_regclass('procrastinate_jobs')")).scalar() is not None:
            return False
        raw: Any = conn.connection.driver_connection
        raw.execute(SchemaManager.get_schema())
    return True


UPGRADE_LOCK = 0x666C7578  # "flux": one upgrade at a time per database


def _upgrade(engine: Engine) -> list[str]:
    _versions.create_all(engine)
    applied = []
    for version, name, step in MIGRATIONS:
        with engine.begin() as conn:
            done = conn.execute(select(schema_migrations.c.version).where(schema_migrations.c.version == version))
            if done.first() is not None:
                continue
            step(conn)
            conn.execute(schema_migrations.insert().values(version=version, name=name, applied_at=time.time()))
        applied.append(f"{version}: {name}")
    return applied


class SchemaOutOfDate(RuntimeError):
    pass


def _queue_ready(st: store.Store) -> bool:
    if st.engine.dialect.name != "postgresql":
        return True
    with st.engine.connect() as conn:
        return conn.execute(text("SELECT to_regclass('procrastinate_jobs')")).scalar() is not None


def open_store(url: str, *, upgrade_embedded: bool = True, **pool: Any) -> store.Store:
    """A Store whose schema is current: embedded SQLite is upgraded in place, others must be upgraded first.

    ``pool``: Store's role and pool sizes."""
    st = store.Store(url, **pool)
    if st.is_sqlite and upgrade_embedded:
        upgrade(st.engine)
    elif (version := current_version(st.engine)) < LATEST or not _queue_ready(st):
        st.close()  # after every read: a read past close() would open a connection nobody closes
        raise SchemaOutOfDate(
            f"The database schema is at version {version}, this fluxserve needs {LATEST}: "
            "run `fluxserve db upgrade --database ...` first."
        )
    return st
