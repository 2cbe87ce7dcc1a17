"""Chaos soak: two API nodes, two workers, PostgreSQL; a mixed load of the dialects with webhooks and cancels
while a driver kill -9s and restarts workers and API nodes and restarts PostgreSQL. Bounded: FLUXSERVE_SOAK_S
seconds of chaos (default 30; bench/soak.py runs it longer), then the invariants over everything accepted."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.support.cluster import RemoteWorker, api_node, sql
from tests.support.pg import cluster, new_database, restart
from tests.support.polling import wait_for
from tests.support.server import FLUXSERVE, RemoteServer
from tests.support.webhook_receiver import Received, webhook_receiver

KEY = "fs-soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SOAK_S = float(os.environ.get("FLUXSERVE_SOAK_S", "30"))
STEPS = {"num_inference_steps": 4, "megapixels": "0.25"}


LAST_RETRY_AFTER: dict[int, bool] = {}  # per load thread: whether its last answer carried Retry-After


def _create(api: str, kind: int, hook: str) -> tuple[int, str | None]:
    status, job_id, retry_after = _create_once(api, kind, hook)
    LAST_RETRY_AFTER[threading.get_ident()] = retry_after
    return status, job_id


def _create_once(api: str, kind: int, hook: str) -> tuple[int, str | None, bool]:
    """One create in one of the dialects: (status, job id or None, whether it said Retry-After)."""
    if kind == 0:
        body = {"input": {"prompt": "soak r", **STEPS}, "webhook": hook}
        url = f"{api}/v1/models/black-forest-labs/flux-dev/predictions"
        resp = httpx.post(url, json=body, headers=AUTH, timeout=20)
        return _answer(resp, "id")
    if kind == 1:
        resp = httpx.post(
            f"{api}/v1/flux-dev",
            json={"prompt": "soak b", "steps": 4, "width": 256, "height": 256},
            headers={"x-key": KEY},
            timeout=20,
        )
        return _answer(resp, "id")
    if kind == 2:
        resp = httpx.post(
            f"{api}/v1/images/generations",
            json={"model": "flux-schnell", "prompt": "soak o", "size": "256x256", "async": True},
            headers=AUTH,
            timeout=20,
        )
        return _answer(resp, "task_id")
    if kind == 3:
        resp = httpx.post(
            f"{api}/fal-ai/flux/schnell",
            json={"prompt": "soak f", "image_size": "square"},
            headers={"Authorization": f"Key {KEY}"},
            timeout=20,
        )
        return _answer(resp, "request_id")
    resp = httpx.post(
        f"{api}/vmodel/generate",
        json={"model": "flux-schnell", "input": {"prompt": "soak v"}},
        headers=AUTH,
        timeout=20,
    )
    return _answer(resp, "id")


def _answer(resp: httpx.Response, field: str) -> tuple[int, str | None, bool]:
    job_id = resp.json().get(field) if resp.status_code < 300 else None
    return resp.status_code, job_id, "retry-after" in resp.headers


def test_chaos_soak_every_accepted_job_ends_exactly_once(tmp_path: Path, demo_model_dir: Path) -> None:
    rng = random.Random(7)
    received = Received()
    with cluster() as server, webhook_receiver(received) as hook:
        db = new_database(server).replace("postgresql+psycopg://", "postgresql://")
        done = subprocess.run(
            [FLUXSERVE, "db", "upgrade", "--database", db], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        storage = tmp_path / "storage"
        private = {"FLUXSERVE_ALLOW_PRIVATE_URLS": "1"}  # the webhook receiver is on loopback
        apis = [api_node(tmp_path / f"api{i}", db, storage, KEY, **private).start() for i in range(2)]
        workers = [RemoteWorker(tmp_path / f"w{i}", db, storage, demo_model_dir).start() for i in range(2)]
        accepted: list[str] = []
        statuses: Counter[int] = Counter()
        bad: list[str] = []
        stop = threading.Event()

        def load() -> None:
            n = 0
            while not stop.is_set():
                api = apis[n % 2].url
                try:
                    status, job_id = _create(api, n % 5, hook)
                except (httpx.HTTPError, ValueError):  # a node being restarted: nothing was accepted
                    status, job_id = 0, None
                statuses[status] += 1
                if status >= 500 and (status != 503 or not LAST_RETRY_AFTER.get(threading.get_ident())):
                    bad.append(f"create {n % 5}: {status} (a 503 must carry Retry-After)")
                if job_id:
                    accepted.append(job_id)
                    if n % 5 == 0 and rng.random() < 0.3:  # Replicate's cancel, for a prediction of its own
                        try:
                            httpx.post(f"{api}/v1/predictions/{job_id}/cancel", headers=AUTH, timeout=10)
                            statuses[-1] += 1
                        except httpx.HTTPError:
                            statuses[-2] += 1  # the node went away meanwhile: the job simply runs on
                n += 1
                time.sleep(0.3)

        def restart_api(i: int) -> None:
            apis[i].kill9()
            apis[i] = RemoteServer(
                apis[i].data_dir, api_key=KEY, port=apis[i].port, extra_args=apis[i].extra_args, env=apis[i].extra_env
            ).start()

        def restart_worker(i: int) -> None:
            workers[i].stop()  # SIGKILL
            workers[i] = RemoteWorker(tmp_path / f"w{i}", db, storage, demo_model_dir).start()

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        faults: Counter[str] = Counter()
        deadline = time.monotonic() + SOAK_S
        try:
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(8, 15))
                fault = rng.choice(["worker", "worker", "api", "postgres"])
                faults[fault] += 1
                if fault == "worker":
                    restart_worker(rng.randrange(2))
                elif fault == "api":
                    restart_api(rng.randrange(2))
                else:
                    restart(server)
            stop.set()
            loader.join(30)

            def open_jobs() -> int:
                return int(sql(db, "SELECT count(*) FROM jobs WHERE status IN ('queued', 'processing')")[0][0])

            wait_for(open_jobs, lambda n: n == 0, timeout=300, interval=1.0)
            rows = {str(r[0]): (str(r[1]), str(r[2])) for r in sql(db, "SELECT id, status, outputs FROM jobs")}
            ends = dict(
                sql(
                    db,
                    "SELECT job_id, count(*) FROM job_events WHERE kind IN "
                    "('succeeded', 'failed', 'canceled', 'aborted') GROUP BY job_id",
                )
            )
            missing = [j for j in accepted if j not in rows]
            not_once = {j: ends.get(j, 0) for j in accepted if ends.get(j, 0) != 1}
            succeeded = [j for j in accepted if rows.get(j, ("", ""))[0] == "succeeded"]
            lost_files = [j for j in succeeded for o in json.loads(rows[j][1]) if not (storage / o["key"]).is_file()]
            wait_for(
                lambda: sql(db, "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")[0][0],
                lambda n: n == 0,
                timeout=120,
                interval=1.0,
            )
            delivered = {str(r[0]) for r in sql(db, "SELECT msg_id FROM webhook_deliveries WHERE state = 'delivered'")}
            seen_ids = {d["headers"]["webhook-id"] for d in received.deliveries}
            report = {
                "accepted": len(accepted),
                "succeeded": len(succeeded),
                "creates": dict(statuses),
                "faults": dict(faults),
                "webhooks_delivered": len(delivered),
            }
            print("soak:", report)
            assert not missing and not not_once, (missing[:5], list(not_once.items())[:5], report)
            assert not lost_files, lost_files[:5]
            assert delivered <= seen_ids, (len(delivered - seen_ids), report)
            assert not bad, bad[:5]
            # Enough traffic that faults hit jobs in every state; how much is a matter of the machine's load
            # (the suite runs in two processes), not something this test judges.
            assert len(accepted) > 20 and len(succeeded) > 10, report
        finally:
            stop.set()
            for w in workers:
                w.stop()
            for a in apis:
                a.stop()
