"""Past one machine: API nodes and workers as separate processes on PostgreSQL, under faults.

Everything here is a real process: `serve --api-only`, `fluxserve worker --demo`, a throwaway PostgreSQL
(tests/pg.py) and one storage folder they share (as an object store would be).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import RemoteWorker, api_node, sql
from tests.e2e.server import RemoteServer
from tests.polling import wait_for

KEY = "fs-scale-out-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LEASE_S = 2.0
# ~1 s of work per job on one core of a 2-core CPU with the demo model.
JOB = {"prompt": "chaos", "megapixels": "0.25", "aspect_ratio": "1:1", "num_inference_steps": 12}


def _predict(api: RemoteServer, i: int, **extra: Any) -> str:
    resp = httpx.post(
        f"{api.url}/v1/models/black-forest-labs/flux-dev/predictions",
        json={"input": JOB | {"seed": i} | extra}, headers=AUTH, timeout=30,
    )  # fmt: skip
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _rows(db: str) -> dict[str, tuple[str, int, str | None]]:
    return {
        str(r[0]): (str(r[1]), int(r[2]), r[3]) for r in sql(db, "SELECT id, status, attempts, worker_id FROM jobs")
    }  # type: ignore[misc]


def _running_on(db: str, pid: int) -> str | None:
    for job_id, (status, _, worker) in _rows(db).items():
        if status == "processing" and worker and f":{pid}:" in worker:
            return job_id
    return None


@pytest.fixture
def cluster_dirs(tmp_path: Path, pg_url: str) -> Iterator[tuple[str, Path]]:
    yield pg_url, tmp_path / "storage"


def test_chaos_kill_cancel_sigterm_every_job_ends_once(
    tmp_path: Path, cluster_dirs: tuple[str, Path], demo_model_dir: Path
) -> None:
    db, storage = cluster_dirs
    started = time.monotonic()
    with api_node(tmp_path / "api", db, storage, KEY) as api:
        w1 = RemoteWorker(tmp_path / "w1", db, storage, demo_model_dir, models="flux-dev").start()
        w2 = RemoteWorker(tmp_path / "w2", db, storage, demo_model_dir, models="flux-dev").start()
        w3 = RemoteWorker(tmp_path / "w3", db, storage, demo_model_dir, models="flux-dev")
        try:
            ids = [_predict(api, i) for i in range(20)]

            # 1. SIGKILL a worker mid-job; a supervisor would start another in its place.
            killed = wait_for(lambda: _running_on(db, w1.pid), lambda j: j is not None, timeout=60)
            wait_for(lambda: sql(db, "SELECT progress_done FROM jobs WHERE id = %s", killed)[0][0], lambda s: s >= 1)
            w1.signal(signal.SIGKILL)
            killed_at = time.time()
            w1.wait(10)
            w3.start()

            # 2. Cancel a job while it runs, through the API node.
            running = wait_for(lambda: _running_on(db, w2.pid), lambda j: j is not None and j != killed, timeout=60)
            assert running is not None
            resp = httpx.post(f"{api.url}/v1/predictions/{running}/cancel", headers=AUTH, timeout=10)
            assert resp.status_code == 200, resp.text

            # 3. SIGTERM the other worker once: its running job finishes, queued ones stay queued.
            in_flight = wait_for(lambda: _running_on(db, w2.pid), lambda j: j is not None and j != running, timeout=60)
            w2.signal(signal.SIGTERM)
            assert w2.wait(60) == 0, w2.log()[-3000:]

            # 4. The third worker drains the rest.
            def terminal() -> dict[str, tuple[str, int, str | None]]:
                return _rows(db)

            rows = wait_for(terminal, lambda r: all(s in ("succeeded", "canceled") for s, _, _ in r.values()),
                            timeout=120, interval=0.5)  # fmt: skip
        finally:
            for w in (w1, w2, w3):
                w.stop()
    elapsed = time.monotonic() - started

    assert {i: s for i, (s, _, _) in rows.items() if s != "succeeded"} == {running: "canceled"}
    assert rows[killed][0] == "succeeded" and rows[killed][1] == 2, rows[killed]  # re-run once, on another worker
    assert rows[in_flight][0] == "succeeded" and rows[in_flight][1] == 1  # finished by the SIGTERMed worker
    # Each job committed its end once, and its images exist once under their fixed keys.
    ends = sql(db, "SELECT job_id, count(*) FROM job_events WHERE kind IN ('succeeded', 'canceled') GROUP BY job_id")
    assert sorted(ends) == sorted((i, 1) for i in ids)
    for job_id in ids:
        files = sorted(p.name for p in (storage / job_id).glob("out-*"))
        assert files == (["out-0.webp"] if job_id != running else []), (job_id, files)
    # Nothing left running in either table.
    assert sql(db, "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')") == [(0,)]
    # The killed worker's job was found stalled and given back to the queue within two lease periods (plus
    # one sweep); a worker took it as soon as one was free.
    events = {
        (str(k), int(a)): float(at)
        for k, a, at in sql(db, "SELECT kind, attempt, at FROM job_events WHERE job_id = %s", killed)
    }  # type: ignore[arg-type]
    found_s, restarted_s = events["requeued", 1] - killed_at, events["started", 2] - killed_at
    print(
        f"chaos: 20 jobs in {elapsed:.1f} s; the killed worker's job was re-queued {found_s:.2f} s after the "
        f"kill and re-started {restarted_s:.2f} s after it"
    )
    assert found_s < 2 * LEASE_S + 1.0
