"""Faults on the PostgreSQL path, with real processes: the database server restarted mid-job, a worker cut
off from it, a row lock held on a running job, the object store away and back."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.cluster import RemoteWorker, api_node, sql
from tests.support.pg import cluster, new_database, restart
from tests.support.polling import wait_for
from tests.support.server import FLUXSERVE, RemoteServer

KEY = "fs-pg-faults-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextmanager
def pg_stack(
    tmp_path: Path, demo: Path, storage: str | None = None, env: dict[str, str] | None = None
) -> Iterator[tuple[str, str, RemoteServer, RemoteWorker]]:
    """A cluster of its own (these tests restart it), a database made ready as an operator does, one
    `serve --api-only` node and one `fluxserve worker --demo` on shared storage (a folder, or ``storage``)."""
    with cluster() as server:
        db = new_database(server).replace("postgresql+psycopg://", "postgresql://")
        done = subprocess.run(
            [FLUXSERVE, "db", "upgrade", "--database", db], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        shared = storage or tmp_path / "storage"
        api = api_node(tmp_path / "api", db, shared, KEY, **(env or {})).start()
        worker = RemoteWorker(tmp_path / "w", db, shared, demo, env=env).start()
        try:
            yield server, db, api, worker
        finally:
            worker.stop()
            api.stop()


def test_postgres_restarted_mid_job_every_job_ends_exactly_once(tmp_path: Path, demo_model_dir: Path) -> None:
    with pg_stack(tmp_path, demo_model_dir) as (server, db, api, worker):
        body = {"input": {"prompt": "through a restart", "num_inference_steps": 12, "megapixels": "0.25"}}
        url = f"{api.url}/v1/models/black-forest-labs/flux-dev/predictions"
        ids = [httpx.post(url, json=body, headers=AUTH, timeout=30).json()["id"] for _ in range(4)]

        def running() -> int:
            return len(sql(db, "SELECT id FROM jobs WHERE status = 'processing'"))

        wait_for(running, lambda n: n >= 1, timeout=120, interval=0.1)
        restart(server)  # -m fast: every connection of every node is cut
        seen = httpx.get(f"{api.url}/health", timeout=10)
        assert seen.status_code in (200, 503)

        # Every job ends, each with one end event, none left processing or re-run past its attempts.
        def ends() -> list[tuple[str, str]]:
            got = httpx.get(f"{api.url}/v1/predictions", headers=AUTH, timeout=10).json()["results"]
            return [(p["id"], p["status"]) for p in got]

        final = wait_for(ends, lambda ps: all(s in ("succeeded", "failed") for _, s in ps), timeout=240)
        assert sorted(i for i, _ in final) == sorted(ids)
        assert all(s == "succeeded" for _, s in final), (final, worker.log()[-3000:])
        events = sql(
            db,
            "SELECT job_id, count(*) FROM job_events WHERE kind IN "
            "('succeeded', 'failed', 'canceled', 'aborted') GROUP BY job_id",
        )
        assert sorted(str(j) for j, n in events if n == 1) == sorted(ids), events
        assert sql(db, "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')") == [(0,)]
        assert httpx.get(f"{api.url}/health", timeout=10).json()["status"] == "ready"


def test_a_worker_cut_off_from_the_database_loses_its_job_to_a_rerun_once(tmp_path: Path, demo_model_dir: Path) -> None:
    """Its connections killed again and again (pg_terminate_backend) while it runs a job: the lease runs out,
    the job is re-queued and runs once more to one end; the worker lives on and takes work again."""
    with pg_stack(tmp_path, demo_model_dir) as (_, db, api, worker):
        body = {"input": {"prompt": "cut off", "num_inference_steps": 30, "megapixels": "0.25"}}
        url = f"{api.url}/v1/models/black-forest-labs/flux-dev/predictions"
        job_id = httpx.post(url, json=body, headers=AUTH, timeout=30).json()["id"]
        wait_for(
            lambda: sql(db, "SELECT status FROM jobs WHERE id = %s", job_id)[0][0],
            lambda s: s == "processing",
            timeout=120,
            interval=0.1,
        )
        mine = f"fluxserve-worker:{worker.pid}"
        deadline = time.monotonic() + 6  # three leases (FLUXSERVE_LEASE_S=2) without a database
        while time.monotonic() < deadline:
            sql(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", mine)
            time.sleep(0.05)
        final = wait_for(
            lambda: httpx.get(f"{api.url}/v1/predictions/{job_id}", headers=AUTH, timeout=10).json(),
            lambda p: p["status"] in ("succeeded", "failed", "canceled"),
            timeout=240,
        )
        assert final["status"] == "succeeded", (final, worker.log()[-3000:])
        [(ends,)] = sql(
            db,
            "SELECT count(*) FROM job_events WHERE job_id = %s AND kind IN "
            "('succeeded', 'failed', 'canceled', 'aborted')",
            job_id,
        )
        assert ends == 1
        assert worker.proc is not None and worker.proc.poll() is None  # the worker outlived it
        again = httpx.post(url, json={"input": {"prompt": "after", "num_inference_steps": 2}}, headers=AUTH).json()
        assert (
            wait_for(
                lambda: httpx.get(f"{api.url}/v1/predictions/{again['id']}", headers=AUTH, timeout=10).json()["status"],
                lambda s: s in ("succeeded", "failed"),
                timeout=120,
            )
            == "succeeded"
        )


def test_a_row_lock_held_60s_on_a_running_job_stalls_it_but_loses_nothing(tmp_path: Path, demo_model_dir: Path) -> None:
    """An operator's psql session holds the running job's row (SELECT ... FOR UPDATE) for 60 s: the worker's
    writes wait, /health still answers, and after the lock goes the job ends exactly once."""
    import psycopg

    with pg_stack(tmp_path, demo_model_dir) as (_, db, api, worker):
        body = {"input": {"prompt": "locked", "num_inference_steps": 20, "megapixels": "0.25"}}
        url = f"{api.url}/v1/models/black-forest-labs/flux-dev/predictions"
        job_id = httpx.post(url, json=body, headers=AUTH, timeout=30).json()["id"]
        wait_for(
            lambda: sql(db, "SELECT status FROM jobs WHERE id = %s", job_id)[0][0],
            lambda s: s == "processing",
            timeout=120,
            interval=0.05,
        )
        with psycopg.connect(db) as holder:
            holder.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            start = time.monotonic()
            while time.monotonic() - start < 60:
                health = httpx.get(f"{api.url}/health", timeout=5)  # bounded: answers within a second
                assert health.status_code in (200, 503)
                time.sleep(5)
            holder.rollback()
        final = wait_for(
            lambda: httpx.get(f"{api.url}/v1/predictions/{job_id}", headers=AUTH, timeout=10).json(),
            lambda p: p["status"] in ("succeeded", "failed", "canceled"),
            timeout=240,
        )
        assert final["status"] == "succeeded", (final, worker.log()[-3000:])
        [(ends,)] = sql(
            db,
            "SELECT count(*) FROM job_events WHERE job_id = %s AND kind IN "
            "('succeeded', 'failed', 'canceled', 'aborted')",
            job_id,
        )
        assert ends == 1
        assert sql(db, "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')") == [(0,)]


def test_the_object_store_away_then_back_jobs_wait_or_fail_clearly_none_lost(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    """ministack stopped under a running stack and started again. A short outage: the worker waits for the
    store (FLUXSERVE_STORAGE_RETRY_S) and every job succeeds, its files readable. Meanwhile a create that
    must store inputs is a 503 with Retry-After in the dialect's shape, and nothing is queued for it. An
    outage past the retry window: the job fails once, saying the storage could not be reached."""
    import io

    from PIL import Image

    from tests.support.s3 import MiniStack

    stack = MiniStack().start()
    try:
        s3 = stack.server
        # The short outage below lasts until a job waits to store (then start): 20 s of waiting leaves margin.
        env = s3.env() | {"FLUXSERVE_STORAGE_RETRY_S": "20"}
        with pg_stack(tmp_path, demo_model_dir, storage=f"s3://{s3.bucket()}/fs", env=env) as (_, db, api, worker):
            url = f"{api.url}/v1/models/black-forest-labs/flux-dev/predictions"
            body = {"input": {"prompt": "through an outage", "num_inference_steps": 6, "megapixels": "0.25"}}
            ids = [httpx.post(url, json=body, headers=AUTH, timeout=30).json()["id"] for _ in range(3)]
            wait_for(
                lambda: sql(db, "SELECT count(*) FROM jobs WHERE status = 'processing'")[0][0],
                lambda n: n >= 1,
                timeout=120,
                interval=0.05,
            )
            stack.stop()
            png = io.BytesIO()
            Image.new("RGB", (64, 64), "red").save(png, "PNG")
            edit = httpx.post(
                f"{api.url}/v1/images/edits",
                headers=AUTH,
                timeout=30,
                data={"prompt": "p", "model": "flux-kontext-pro"},
                files={"image": ("a.png", png.getvalue(), "image/png")},
            )
            assert edit.status_code == 503 and edit.headers.get("Retry-After"), edit.text
            assert edit.json()["error"]["code"] == "storage_unavailable", edit.text
            # A job ends meanwhile and waits to store its image (however slow this machine is today).
            wait_for(worker.log, lambda log: "degraded: object store" in log, timeout=120, interval=0.2)
            stack.start()

            def statuses(job_ids: list[str]) -> list[dict[str, object]]:
                return [httpx.get(f"{api.url}/v1/predictions/{i}", headers=AUTH, timeout=10).json() for i in job_ids]

            def ended(preds: list[dict[str, object]]) -> bool:
                return all(p["status"] in ("succeeded", "failed", "canceled") for p in preds)

            final = wait_for(lambda: statuses(ids), ended, timeout=240)
            brief = [(p["id"], p["status"], p["error"]) for p in final]
            assert all(p["status"] == "succeeded" for p in final), (brief, worker.log()[-3000:])
            for p in final:
                assert isinstance(p["output"], list)
                assert httpx.get(p["output"][0], timeout=10).status_code == 200  # stored once, readable
            assert sql(db, "SELECT count(*) FROM jobs") == [(3,)]  # the refused edit left no job

            # Away for longer than the worker waits: the job fails, once, with the reason.
            stack.stop()
            late = httpx.post(url, json=body, headers=AUTH, timeout=30).json()["id"]
            [failed] = wait_for(lambda: statuses([late]), ended, timeout=240)
            stack.start()
            assert failed["status"] == "failed" and "object store" in str(failed["error"]), failed
            events = sql(
                db,
                "SELECT job_id, count(*) FROM job_events WHERE kind IN "
                "('succeeded', 'failed', 'canceled', 'aborted') GROUP BY job_id",
            )
            assert sorted((str(j), n) for j, n in events) == sorted((i, 1) for i in [*ids, late])
            assert sql(db, "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')") == [(0,)]
    finally:
        stack.stop()
