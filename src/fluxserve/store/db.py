"""The database: engine, connection pools, write serialization on SQLite, and errors as StoreUnavailable.

SQLite (WAL) by default, any SQLAlchemy URL otherwise. Every database error surfaces as
StoreUnavailable, which callers retry (workers) or answer as 503 (the API).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.sql.dml import UpdateBase

from ..errors import StoreUnavailable

log = logging.getLogger(__name__)

BUSY_S = 5.0  # how long a write waits for a locked database before it is StoreUnavailable
BUSY_SLACK_S = 0.1  # how far past BUSY_S a write may wait, in all, before its SQLite wait is shortened

# Connections one process holds on a database server (SQLite has none): POOL_SIZE kept, POOL_OVERFLOW more
# at busy moments; threads beyond that wait for one. README "Beyond one machine" adds them up per node.
POOL_SIZE = 5
POOL_OVERFLOW = 5
POOL_WAIT_S = 10.0  # a thread that waits longer for a connection gets StoreUnavailable (503), not a hang
# A pooled connection idle this long is pinged before use (a server restart or an idle timeout may have
# closed it); one used more recently is trusted: a ping on every checkout was a third of a poll's CPU
# (bench/api_cpu.py). If the server went away meanwhile, that one statement fails (StoreUnavailable:
# a 503 with Retry-After, or a worker's retry) and SQLAlchemy drops every connection older than it.
IDLE_PING_S = 5.0


_CLOCK = select(func.extract("epoch", func.clock_timestamp()))  # built once: the sweeps read it every second


def clock(conn: Connection) -> float:
    """Now, by the database server's clock on PostgreSQL (every node agrees on it), else this machine's."""
    if conn.dialect.name == "postgresql":
        return float(conn.execute(_CLOCK).scalar_one())
    return time.time()


_Form = tuple[str, tuple[str, ...], tuple[Callable[[Any], Any] | None, ...], dict[str, Any]]


@functools.lru_cache(maxsize=256)
def _sqlite_form(stmt: UpdateBase, keys: tuple[str, ...], dialect: Dialect) -> _Form | None:
    """The statement as SQLite's driver takes it (its SQL, its parameters' order, their type conversions and
    the values it carries itself, like the 1 of ``attempts + 1``), compiled once; None where it needs a value
    computed at run time (a Python-side default)."""
    compiled = stmt.compile(dialect=dialect, column_keys=list(keys))
    names = tuple(compiled.positiontup or ())
    carried = {n: compiled.binds[n] for n in names if n not in keys}
    if any(b.callable is not None or b.required for b in carried.values()):
        return None
    convert = tuple(compiled.binds[n].type.bind_processor(dialect) for n in names)
    return str(compiled), names, convert, {n: b.value for n, b in carried.items()}


@functools.lru_cache(maxsize=64)
def _row_type(names: tuple[str, ...]) -> Any:
    return namedtuple("Row", names, rename=True)  # read by attribute, as SQLAlchemy's rows are (rows.to_job)


def send(conn: Connection, stmt: UpdateBase, params: Mapping[str, Any], *, row: bool = False) -> Any:
    """One of the statements every job's way runs (its insert, its events, its transitions): on SQLite
    straight through the driver's cursor with its compiled form, the first row back when ``row``.
    SQLAlchemy's own per-execution work (the cache key over the statement, an execution context, the result's
    metadata) was twice the statement's run for these; its errors are raised as SQLAlchemy raises them. On
    other databases it is SQLAlchemy's execute."""
    form = _sqlite_form(stmt, tuple(params), conn.dialect) if conn.dialect.name == "sqlite" else None
    if form is None:
        result = conn.execute(stmt, params)
        return result.first() if row else None
    sql, names, convert, carried = form
    raw = [params[n] if n in params else carried[n] for n in names]
    values = [v if c is None else c(v) for v, c in zip(raw, convert, strict=True)]
    dbapi = conn.dialect.loaded_dbapi
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql, values)
        got = cursor.fetchone() if row else None
        return None if got is None else _row_type(tuple(d[0] for d in cursor.description))._make(got)
    except dbapi.Error as exc:
        raise DBAPIError.instance(sql, values, exc, dbapi.Error) from exc
    finally:
        cursor.close()


class _NoLock:
    """Servers with row locks (PostgreSQL) need no process-wide write lock."""

    def acquire(self, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    # Writers in this process queue on a lock (below); this only waits for other processes.
    cur.execute(f"PRAGMA busy_timeout={int(BUSY_S * 1000)}")
    cur.close()


def _private_file(path: Path) -> None:
    """The database holds key hashes and webhook secrets: owner-only (SQLite gives its -wal and -shm
    files the main file's mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(path, 0o600)


def _used(_dbapi_conn: Any, record: Any) -> None:
    record.info["used_at"] = time.monotonic()


def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    """SQLAlchemy's pessimistic disconnect handling, for idle connections only: DisconnectionError makes
    the pool discard this one and check out another (a new connection when every old one is gone)."""
    if time.monotonic() - record.info.get("used_at", 0.0) < IDLE_PING_S:
        return
    try:
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True  # the ping opens no transaction
        try:
            dbapi_conn.execute("SELECT 1")
        finally:
            dbapi_conn.autocommit = autocommit
    except Exception as exc:  # psycopg's errors for a closed or broken connection, whichever it is
        raise DisconnectionError(str(exc)) from exc


def application_name(role: str) -> str:
    """How this process's connections show in pg_stat_activity: the role and the pid."""
    return f"fluxserve-{role}:{os.getpid()}"


def reason(exc: DBAPIError) -> str:
    return str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__


class Database:
    """One engine per process and role; ``_write`` / ``_read`` are the only ways the table modules connect."""

    def __init__(
        self, url: str, *, role: str = "api", pool_size: int = POOL_SIZE, pool_overflow: int = POOL_OVERFLOW
    ) -> None:
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
                url,
                pool_size=pool_size,
                max_overflow=pool_overflow,
                pool_timeout=POOL_WAIT_S,
                connect_args={"application_name": application_name(role)},
            )
            event.listen(self.engine, "checkout", _ping_if_idle)
            event.listen(self.engine, "checkin", _used)
            event.listen(self.engine, "connect", _used)  # a new connection needs no ping
        # Reads are single statements or don't need one snapshot: no BEGIN and ROLLBACK round trips.
        self._reader = self.engine if self.is_sqlite else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # SQLite has one writer: threads of this process take turns here instead of in SQLite's
        # busy handler, which sleeps in steps of up to 100 ms.
        self._write_lock = threading.Lock() if self.is_sqlite else _NoLock()

    def close(self) -> None:
        self.engine.dispose()

    @staticmethod
    def _busy_timeout(conn: Connection, left_s: float) -> None:
        """SQLite's wait for another process's lock: what is left of the write's one deadline. Set only where
        it moves by more than BUSY_SLACK_S from what this connection has (a statement per write otherwise)."""
        left_ms = max(1, int(left_s * 1000))
        info = conn.connection.info
        if abs(info.get("busy_ms", int(BUSY_S * 1000)) - left_ms) > BUSY_SLACK_S * 1000:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={left_ms}")
            info["busy_ms"] = left_ms

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        # One deadline for both waits: a write queued behind one stuck on a locked file waits for this
        # process's turn and then for SQLite's lock within BUSY_S in all, not BUSY_S each.
        started = time.monotonic()
        if not self._write_lock.acquire(timeout=BUSY_S):
            raise StoreUnavailable(f"The database is unavailable: database is locked (waited {BUSY_S:g} s)")
        try:
            with self.engine.begin() as conn:
                if self.is_sqlite:
                    self._busy_timeout(conn, BUSY_S - (time.monotonic() - started))
                yield conn
        except IntegrityError:
            raise
        except DBAPIError as exc:
            raise self._unavailable(exc) from exc
        except PoolTimeout as exc:
            raise StoreUnavailable(f"The database is busy: no connection free within {POOL_WAIT_S:g} s") from exc
        finally:
            self._write_lock.release()

    def transaction(self) -> contextlib.AbstractContextManager[Connection]:
        """A write transaction for statements composed elsewhere: JobService's create, the queue's own."""
        return self._write()

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self._reader.connect() as conn:
                yield conn
        except DBAPIError as exc:
            raise self._unavailable(exc) from exc
        except PoolTimeout as exc:
            raise StoreUnavailable(f"The database is busy: no connection free within {POOL_WAIT_S:g} s") from exc

    def _unavailable(self, exc: DBAPIError) -> StoreUnavailable:
        """SQLite's reasons are about this machine's file (locked, disk full) and say what to fix; a database
        server's name its host, port and user, which clients must not read: those go to the log only."""
        if self.is_sqlite:
            return StoreUnavailable(f"The database is unavailable: {reason(exc)}")
        log.warning("database error: %s", reason(exc))
        kind = type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__
        return StoreUnavailable(f"The database is unavailable ({kind}); the server log has the details.")

    def now(self) -> float:
        """The time leases are measured in: the database's clock on PostgreSQL (nodes' clocks may skew)."""
        if self.is_sqlite:
            return time.time()
        with self._read() as conn:
            return clock(conn)

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute(select(1))
