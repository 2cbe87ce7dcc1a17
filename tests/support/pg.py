"""A throwaway PostgreSQL cluster for the tests: initdb in a temp dir, loopback, a free port, removed after.

FLUXSERVE_TEST_DATABASE_URL (a server's URL whose user may create databases) is used instead when set.
A test that needs PostgreSQL fails when neither works: CI never skips them silently.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg


def _bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql; scripts/test.sh does it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(args: list[str]) -> list[str]:
    """initdb refuses root: as root, run the cluster as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


# The clusters this process started, by base URL: what restart() needs (bin dir, data dir, log, options).
_STARTED: dict[str, tuple[Path, Path, Path, str]] = {}


def restart(base: str, mode: str = "fast") -> None:
    """pg_ctl restart of a cluster started here: every connection is cut, the server is back after."""
    bindir, data, log, opts = _STARTED[base]
    ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-m", mode, "-w", "-o", opts, "restart"]
    subprocess.run(_as_postgres(ctl), check=True, capture_output=True, timeout=120)


@contextmanager
def cluster() -> Iterator[str]:
    """A running server's base URL (postgresql://user@127.0.0.1:port), stopped and deleted on exit."""
    given = os.environ.get("FLUXSERVE_TEST_DATABASE_URL")
    if given:
        yield given.rsplit("/", 1)[0]
        return
    bindir = _bin_dir()
    tmp = Path(tempfile.mkdtemp(prefix="fluxserve-pg-"))
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres", "postgres")
    tmp.chmod(0o700)
    data = tmp / "data"
    port = _free_port()
    run = lambda args: subprocess.run(_as_postgres(args), check=True, capture_output=True, timeout=60)  # noqa: E731
    try:
        run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ]
        )
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {tmp} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=300"
        )
        run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(tmp / "log"), "-w", "-o", opts, "start"])
        base = f"postgresql://postgres@127.0.0.1:{port}"
        _STARTED[base] = (bindir, data, tmp / "log", opts)
        yield base
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(tmp, ignore_errors=True)


def new_database(base: str) -> str:
    """A fresh, empty database on that server: its SQLAlchemy URL."""
    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
