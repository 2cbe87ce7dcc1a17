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

from tests.support.cluster import RemoteWorker, api_node, sql
from tests.support.polling import wait_for
from tests.support.server import RemoteServer

KEY = "fs-scale-out-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LEASE_S = 2.0
# ~1 s of work per job on one core of a 2-core CPU with the demo model.
JOB = {"prompt": "chaos", "megapixels": "0.25", "aspect_ratio": "1:1", "num_inference_steps": 12}


def _predict(api: RemoteServer, i: int, **extra: Any) -> str:
    resp = httpx.post(
        f"{api.url}/v1/models/black-forest-labs/flux-dev/predictions",
        json={"input": JOB | {"seed": i} | extra},
        headers=AUTH,
        timeout=30,
    )
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


class ConnectionCounter:
    """Samples pg_stat_activity: the most connections each fluxserve process held at once (by pid)."""

    def __init__(self, db: str) -> None:
        import threading

        self.db = db
        self.most: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            now: dict[str, int] = {}
            for name, n in sql(
                self.db,
                "SELECT application_name, count(*) FROM pg_stat_activity "
                "WHERE application_name LIKE 'fluxserve-%%' GROUP BY 1",
            ):
                pid = str(name).rsplit(":", 1)[1]
                now[pid] = now.get(pid, 0) + int(n)  # type: ignore[call-overload]
            for pid, n in now.items():
                self.most[pid] = max(self.most.get(pid, 0), n)

    def __enter__(self) -> ConnectionCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def cluster_dirs(tmp_path: Path, pg_server: str) -> Iterator[tuple[str, Path]]:
    """A fresh database made ready as an operator does: `fluxserve db upgrade`, twice (it is idempotent)."""
    import subprocess

    from tests.support.pg import new_database
    from tests.support.server import FLUXSERVE

    db = new_database(pg_server).replace("postgresql+psycopg://", "postgresql://")  # as users write it
    first = subprocess.run([FLUXSERVE, "db", "upgrade", "--database", db], capture_output=True, text=True, timeout=60)
    again = subprocess.run([FLUXSERVE, "db", "upgrade", "--database", db], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "applied procrastinate 3.10 schema" in first.stdout, first.stdout + first.stderr
    assert again.returncode == 0 and "applied" not in again.stdout and "schema at version" in again.stdout
    yield db, tmp_path / "storage"


def test_chaos_kill_cancel_sigterm_every_job_ends_once(
    tmp_path: Path, cluster_dirs: tuple[str, Path], demo_model_dir: Path
) -> None:
    db, storage = cluster_dirs
    started = time.monotonic()
    with api_node(tmp_path / "api", db, storage, KEY) as api, ConnectionCounter(db) as connections:
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
            # Early in its 12 steps, so the cancel cannot lose the race with the job's end.
            def early_on_w2() -> str | None:
                job = _running_on(db, w2.pid)
                if job is None or job == killed:
                    return None
                return job if int(sql(db, "SELECT progress_done FROM jobs WHERE id = %s", job)[0][0]) <= 4 else None  # type: ignore[call-overload]

            running = wait_for(early_on_w2, lambda j: j is not None, timeout=60, interval=0.02)
            assert running is not None
            resp = httpx.post(f"{api.url}/v1/predictions/{running}/cancel", headers=AUTH, timeout=10)
            assert resp.status_code == 200, resp.text

            # 3. SIGTERM the other worker once: its running job finishes, queued ones stay queued.
            # Not the killed worker's job either: re-queued, it may be running on w2 now, on its second attempt.
            in_flight = wait_for(
                lambda: _running_on(db, w2.pid), lambda j: j is not None and j not in (running, killed), timeout=60
            )
            w2.signal(signal.SIGTERM)
            assert w2.wait(60) == 0, w2.log()[-3000:]

            # 4. The third worker drains the rest.
            def terminal() -> dict[str, tuple[str, int, str | None]]:
                return _rows(db)

            rows = wait_for(
                terminal,
                lambda r: all(s in ("succeeded", "canceled") for s, _, _ in r.values()),
                timeout=120,
                interval=0.5,
            )
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
    # The cancel stopped the running job at its next step: at most one more progress write after it.
    kinds = [str(k) for (k,) in sql(db, "SELECT kind FROM job_events WHERE job_id = %s ORDER BY id", running)]
    assert kinds[kinds.index("cancel_requested") :].count("progress") <= 1, kinds
    # Nothing left running in either table: a queue row the killed worker held (or one handed to its warm queue)
    # is closed by the API node's stall sweep, which runs every lease period, so this holds within a few of them.
    open_rows = "SELECT id, queue_name, status FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
    wait_for(lambda: sql(db, open_rows), lambda r: r == [], timeout=4 * LEASE_S + 10, interval=0.5)
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
    # Connections stay within what the docs' "Beyond one machine" (docs/scale-out.md) tell operators to plan for.
    from fluxserve.queue.pg.runner import POOL_MAX, WORKER_POOL
    from fluxserve.store import POOL_OVERFLOW, POOL_SIZE

    api_pid = str(api.proc.pid) if api.proc else ""
    worker_most = {pid: n for pid, n in connections.most.items() if pid != api_pid}
    print(f"chaos: most connections held: API node {connections.most.get(api_pid)}, workers {worker_most}")
    assert connections.most.get(api_pid, 0) <= POOL_SIZE + POOL_OVERFLOW + 1
    assert worker_most and max(worker_most.values()) <= WORKER_POOL + POOL_MAX + 1


def _openai(api: RemoteServer, key: str, timeout: float = 120) -> httpx.Response:
    body = {"model": "flux-dev", "prompt": "wait for me", "size": "512x512", "seed": 7}
    return httpx.post(
        f"{api.url}/v1/images/generations", json=body, timeout=timeout, headers=AUTH | {"Idempotency-Key": key}
    )


def test_api_nodes_share_jobs_webhooks_and_idempotency_keys(
    tmp_path: Path, cluster_dirs: tuple[str, Path], demo_model_dir: Path
) -> None:
    import threading

    from tests.support.webhook_receiver import Received, webhook_receiver

    db, storage = cluster_dirs
    private = {"FLUXSERVE_ALLOW_PRIVATE_URLS": "1"}
    got = Received()
    with (
        api_node(tmp_path / "a", db, storage, KEY, **private) as a,
        api_node(tmp_path / "b", db, storage, KEY, **private) as b,
        RemoteWorker(tmp_path / "w", db, storage, demo_model_dir, models="flux-dev"),
        webhook_receiver(got) as hook,
    ):
        # An API node is light: no torch in its address space.
        assert a.proc is not None and "libtorch" not in Path(f"/proc/{a.proc.pid}/maps").read_text()
        # Webhooks: written by the worker's transitions, sent by whichever API node claims each delivery.
        resp = httpx.post(
            f"{a.url}/v1/models/black-forest-labs/flux-dev/predictions",
            headers=AUTH,
            timeout=30,
            json={
                "input": JOB | {"num_inference_steps": 4},
                "webhook": hook,
                "webhook_events_filter": ["start", "output", "logs", "completed"],
            },
        )
        assert resp.status_code == 201, resp.text
        hooked = resp.json()["id"]
        # Wait for the completed event itself: an earlier "output" delivery sent after the job ended
        # already reads "succeeded", and killing node A below while it holds the claim on the completed
        # delivery would leave that one for node B's next claim, after this test has ended.
        outbox_sql = "SELECT event, state FROM webhook_deliveries WHERE job_id = %s ORDER BY id"
        wait_for(
            lambda: sql(db, outbox_sql, hooked),
            lambda rows: bool(rows) and rows[-1] == ("completed", "delivered"),
            timeout=60,
        )

        # A client waits on node A for a synchronous image; node A is SIGKILLed meanwhile.
        first: list[BaseException | httpx.Response] = []
        waiting = threading.Thread(target=lambda: first.append(_catch(lambda: _openai(a, "same-key"))))
        waiting.start()
        job_id = wait_for(
            lambda: sql(db, "SELECT id, status FROM jobs WHERE idempotency_key = 'same-key'"),
            lambda r: bool(r) and r[0][1] == "processing",
            timeout=60,
        )[0][0]
        a.kill9()
        waiting.join(30)
        assert first and isinstance(first[0], httpx.HTTPError)  # the client saw its connection drop
        # Its retry on node B, with the same key, waits for the same job, which went on running.
        retry = _openai(b, "same-key")
        assert retry.status_code == 200, retry.text
        assert f"/files/{job_id}/out-0.png" in retry.json()["data"][0]["url"]
        assert sql(db, "SELECT count(*) FROM jobs WHERE idempotency_key = 'same-key'") == [(1,)]
        assert httpx.get(retry.json()["data"][0]["url"], timeout=10).status_code == 200  # node B serves A's job

    # Each outbox row was delivered once, whichever node sent it, in the order the job's transitions wrote
    # them; the completed event is the last.
    outbox = sql(db, "SELECT msg_id, event, state FROM webhook_deliveries WHERE job_id = %s ORDER BY id", hooked)
    received = [d["headers"]["webhook-id"] for d in got.deliveries if d["body"]["id"] == hooked]
    assert received == [m for m, _, _ in outbox], (received, outbox)
    assert {state for _, _, state in outbox} == {"delivered"} and outbox[-1][1] == "completed"
    assert got.deliveries[-1]["body"]["status"] == "succeeded"


def _catch(fn: Any) -> Any:
    try:
        return fn()
    except httpx.HTTPError as exc:
        return exc


def test_workers_take_only_their_models_and_a_second_sigterm_gives_the_job_back(
    tmp_path: Path, cluster_dirs: tuple[str, Path], demo_model_dir: Path
) -> None:
    db, storage = cluster_dirs
    with api_node(tmp_path / "api", db, storage, KEY) as api:
        dev_only = RemoteWorker(
            tmp_path / "w1", db, storage, demo_model_dir, models="flux-dev", env={"FLUXSERVE_SHUTDOWN_GRACE_S": "60"}
        ).start()
        both = RemoteWorker(tmp_path / "w2", db, storage, demo_model_dir, models="flux-dev,flux-schnell")
        try:
            resp = httpx.post(
                f"{api.url}/v1/models/black-forest-labs/flux-schnell/predictions",
                headers=AUTH,
                json={"input": {"prompt": "schnell", "megapixels": "0.25"}},
                timeout=30,
            )
            schnell = resp.json()["id"]
            # Long enough to outlast the waits below on a loaded CI machine (0.25 MP was not, twice).
            slow = _predict(api, 1, num_inference_steps=50, megapixels="1", num_outputs=4)
            wait_for(
                lambda: sql(db, "SELECT status, progress_done FROM jobs WHERE id = %s", slow)[0],
                lambda r: r[0] == "processing" and int(r[1]) >= 1,
                timeout=60,
            )
            # /health reads the registry in the background (every quarter lease): it catches up within one.
            health = wait_for(
                lambda: httpx.get(f"{api.url}/health", timeout=10).json(),
                lambda h: h["status"] == "ready" and [w["current_job"] for w in h["engine"]["workers"]] == [slow],
                timeout=10,
            )
            assert health["status"] == "ready" and health["models"] == ["flux-dev"], health
            assert health["engine"]["queues"] == {"flux-schnell": 1}, health
            assert [w["models"] for w in health["engine"]["workers"]] == [["flux-dev"]]
            assert sql(db, "SELECT status FROM jobs WHERE id = %s", schnell) == [("queued",)]  # not its model

            dev_only.signal(signal.SIGTERM)
            time.sleep(0.5)
            dev_only.signal(signal.SIGTERM)  # twice: give the running job back now, not in 60 s
            assert dev_only.wait(30) == 0, dev_only.log()[-3000:]
            assert sql(db, "SELECT status, attempts FROM jobs WHERE id = %s", slow) == [("queued", 0)]

            both.start()
            rows = wait_for(
                lambda: sql(db, "SELECT status, attempts FROM jobs ORDER BY id"),
                lambda r: all(s == "succeeded" for s, _ in r),
                timeout=300,
            )
            assert sorted(int(a) for _, a in rows) == [1, 1]  # the given-back job kept its attempt
        finally:
            dev_only.stop()
            both.stop()


def test_jobs_go_to_the_worker_that_has_their_model_warm(
    tmp_path: Path, cluster_dirs: tuple[str, Path], demo_model_dir: Path
) -> None:
    """Two workers serve two names of different weights (demo names of one family share one pipeline), each
    with one of them loaded: every job, whichever worker fetched it, runs
    on the worker that has its model warm, and neither loads the other's model."""
    db, storage = cluster_dirs
    cheap = {"prompt": "warm", "megapixels": "0.25", "aspect_ratio": "1:1", "num_inference_steps": 2}
    with api_node(tmp_path / "api", db, storage, KEY) as api:
        workers = {
            model: RemoteWorker(
                tmp_path / model,
                db,
                storage,
                demo_model_dir,
                models="flux-dev,flux-2-klein-4b",
                env={"FLUXSERVE_PRELOAD": model, "FLUXSERVE_MAX_MODEL_WAIT_S": "60"},
            ).start()
            for model in ("flux-dev", "flux-2-klein-4b")
        }
        try:
            wait_for(
                lambda: sql(db, "SELECT warm, current_job, state FROM fluxserve_workers"),
                lambda rows: sorted(str(r[0]) for r in rows if r[1] is None) == ['["flux-2-klein-4b"]', '["flux-dev"]'],
                timeout=120,
            )
            ran_on: dict[str, str] = {}
            for i in range(8):
                model = ("flux-dev", "flux-2-klein-4b")[i % 2]
                made = httpx.post(
                    f"{api.url}/v1/models/black-forest-labs/{model}/predictions",
                    json={"input": cheap | {"seed": i}},
                    headers=AUTH,
                    timeout=30,
                )
                assert made.status_code == 201, made.text
                job_id = made.json()["id"]
                done = wait_for(
                    lambda job_id=job_id: sql(db, "SELECT status, worker_id FROM jobs WHERE id = %s", job_id)[0],
                    lambda r: r[0] in ("succeeded", "failed"),
                    timeout=60,
                )
                assert done[0] == "succeeded", done
                ran_on[f"{model}#{i}"] = next(m for m, w in workers.items() if f":{w.pid}:" in str(done[1]))
            assert all(key.split("#")[0] == warm for key, warm in ran_on.items()), ran_on
            # Each loaded only its preloaded model: a hand-off, never a second load.
            warm = sql(db, "SELECT warm FROM fluxserve_workers ORDER BY warm")
            assert [str(r[0]) for r in warm] == ['["flux-2-klein-4b"]', '["flux-dev"]'], warm
            handed = sum(w.log().count("is warm on another worker") for w in workers.values())
            print(f"{handed} of 8 jobs were fetched by the cold worker and handed to the warm one")
        finally:
            for w in workers.values():
                w.stop()


def test_mcp_calls_on_api_only_nodes_follow_one_job_across_nodes(
    tmp_path: Path, cluster_dirs: tuple[str, Path], demo_model_dir: Path
) -> None:
    """/mcp is stateless: a generate_image on node A that outlives its wait is followed by get_task on node B,
    with progress notifications carried by PostgreSQL's notifications to whichever node waits."""
    import mcp.types as mt

    from tests.support.mcp_client import over_http

    db, storage = cluster_dirs
    progress: list[float] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    slow = {"FLUXSERVE_DEMO_STEP_DELAY_S": "0.1"}
    with (
        api_node(tmp_path / "a", db, storage, KEY) as a,
        api_node(tmp_path / "b", db, storage, KEY) as b,
        RemoteWorker(tmp_path / "w", db, storage, demo_model_dir, models="flux-dev", env=slow),
    ):
        # Node A waits for the whole job: its steps reach A through PostgreSQL's notifications.
        args = {"prompt": "relay", "model": "flux-dev", "steps": 20, "size": "256x256", "wait_s": 120}
        whole = over_http(a.url, KEY, lambda c: c.call_tool("generate_image", args, progress_callback=on_progress))
        assert whole.structured_content["status"] == "succeeded", whole.content
        # A job that outlives its call on node A is followed by get_task on node B.
        first = over_http(a.url, KEY, lambda c: c.call_tool("generate_image", args | {"wait_s": 0}))
        assert not first.is_error, first.content
        assert first.structured_content["status"] in ("queued", "processing")
        task_id = first.structured_content["id"]
        done = over_http(b.url, KEY, lambda c: c.call_tool("get_task", {"id": task_id, "wait_s": 60}))
        assert done.structured_content["status"] == "succeeded", done.structured_content
        assert [c.mime_type for c in done.content if isinstance(c, mt.ImageContent)] == ["image/png"]
        assert httpx.get(done.structured_content["images"][0]["url"], timeout=10).status_code == 200
    assert progress and progress == sorted(progress) and progress[-1] == 20, progress
