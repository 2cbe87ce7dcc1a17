"""Upstream workers beyond one box: `serve --api-only` and `worker --upstreams-only` (no torch) on PostgreSQL,
forwarding to fluxserve B. kill -9 of the worker mid-poll: a new worker resumes the same upstream task."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_upstreams import A_KEY, B_KEY, FAL_KEY, b_jobs, bfl_wait, config, image_meta
from tests.support.cluster import RemoteWorker, api_node, sql
from tests.support.polling import wait_for
from tests.support.server import FLUXSERVE, RemoteServer


@pytest.fixture
def database(pg_server: str) -> str:
    from tests.support.pg import new_database

    db = new_database(pg_server).replace("postgresql+psycopg://", "postgresql://")
    done = subprocess.run([FLUXSERVE, "db", "upgrade", "--database", db], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return db


@pytest.fixture
def b(tmp_path: Path, demo_model_dir: Path) -> Iterator[RemoteServer]:
    with RemoteServer(tmp_path / "b", api_key=B_KEY, demo_model=demo_model_dir) as srv:
        yield srv


def upstream_worker(data: Path, db: str, storage: Path, toml: Path, demo: Path) -> RemoteWorker:
    worker = RemoteWorker(data, db, storage, demo, env={"B_KEY": B_KEY, "FAL_KEY": FAL_KEY})
    worker.cmd = [
        FLUXSERVE,
        "worker",
        "--upstreams-only",
        "--database",
        db,
        "--storage",
        f"file://{storage}",
        "--data-dir",
        str(data),
        "--upstream-config",
        str(toml),
    ]
    return worker


def test_upstreams_only_worker_on_postgres_resumes_after_kill9(
    tmp_path: Path, database: str, b: RemoteServer, demo_model_dir: Path
) -> None:
    storage = tmp_path / "storage"
    toml = tmp_path / "upstreams.toml"
    toml.write_text(config(b.url, "http://127.0.0.1:9"))
    api = api_node(tmp_path / "api", database, storage, A_KEY, FLUXSERVE_UPSTREAM_CONFIG=str(toml))
    api.start()
    worker = upstream_worker(tmp_path / "w", database, storage, toml, demo_model_dir).start()
    try:
        before = len(b_jobs(b))
        created = httpx.post(
            f"{api.url}/v1/flux-pro-1.1",
            json={"prompt": "pg resume", "width": 1024, "height": 1024},
            headers={"x-key": A_KEY},
        )
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]

        def task_recorded() -> bool:
            rows = sql(database, "SELECT payload FROM job_events WHERE job_id = %s AND kind = 'upstream'", job_id)
            return any('"phase": "task"' in str(r[0]) for r in rows)

        wait_for(task_recorded, bool, timeout=60, interval=0.05)
        maps = Path(f"/proc/{worker.pid}/maps").read_text()
        assert "libtorch" not in maps  # --upstreams-only never imports torch
        worker.stop()  # SIGKILL
        assert sql(database, "SELECT status FROM jobs WHERE id = %s", job_id)[0][0] == "processing"
        again = upstream_worker(tmp_path / "w", database, storage, toml, demo_model_dir).start()
        try:
            result = bfl_wait(api, job_id, timeout=120)
            assert result["status"] == "Ready", (result, again.log()[-3000:])
            assert image_meta(result["result"]["sample"])["upstream"] == "bfl"
        finally:
            again.stop()
        assert [(d, m) for _, d, m in b_jobs(b)[before:]] == [("bfl", "flux-pro")]  # one task upstream
        [(attempts,)] = sql(database, "SELECT attempts FROM jobs WHERE id = %s", job_id)
        assert attempts == 2
        queue = sql(database, "SELECT queue_name, status FROM procrastinate_jobs")
        assert queue == [("upstream:bfl", "succeeded")]
        assert B_KEY not in api.log() + worker.log() + again.log()
    finally:
        worker.stop()
        api.stop()
