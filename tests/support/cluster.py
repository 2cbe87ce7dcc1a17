"""Several real processes on one PostgreSQL database: `serve --api-only` nodes and `fluxserve worker`s,
sharing one storage folder, as an operator runs them on several machines."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType

import psycopg

from tests.support.server import FLUXSERVE, RemoteServer

# Short liveness periods, so a lost worker's job comes back within seconds (production: 20 s leases).
FAST_LEASES = {"FLUXSERVE_LEASE_S": "2", "OMP_NUM_THREADS": "1"}


def storage_url(storage: Path | str) -> str:
    """A shared folder, or an object store's s3://bucket/prefix as it is."""
    return storage if isinstance(storage, str) else f"file://{storage}"


def api_node(data_dir: Path, db: str, storage: Path | str, api_key: str, **env: str) -> RemoteServer:
    return RemoteServer(
        data_dir,
        api_key=api_key,
        extra_args=("--database", db, "--api-only", "--storage", storage_url(storage)),
        env=FAST_LEASES | env,
    )


class RemoteWorker:
    """`fluxserve worker --demo --device cpu` on the shared database and storage."""

    def __init__(
        self,
        data_dir: Path,
        db: str,
        storage: Path | str,
        demo_model: Path,
        *,
        models: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if not (data_dir / "demo-model").exists():
            shutil.copytree(demo_model, data_dir / "demo-model")
        self.cmd = [
            FLUXSERVE,
            "worker",
            "--demo",
            "--device",
            "cpu",
            "--database",
            db,
            "--storage",
            storage_url(storage),
            "--data-dir",
            str(data_dir),
            *(["--models", models] if models else []),
        ]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXSERVE_")}
        self.env |= {"HF_HUB_OFFLINE": "1"} | FAST_LEASES | (env or {})
        self.log_path = data_dir / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RemoteWorker:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None and not self._log.closed:
            self._log.close()

    def __enter__(self) -> RemoteWorker:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def sql(db: str, query: str, *args: object) -> list[tuple[object, ...]]:
    """Read the shared database as an operator would (psql), to see where each job is."""
    with psycopg.connect(db.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        return list(conn.execute(query, args).fetchall())  # type: ignore[arg-type]
