"""kill -9 with jobs queued and one running: after a restart every accepted job succeeds."""

from pathlib import Path
from typing import Any

import httpx

from tests.support.polling import wait_for
from tests.support.server import RemoteServer

KEY = "fs-recovery-key"
# A dead server's jobs come back when their lease runs out: short here, 20 s by default. A job takes a while
# by the demo's pause after each step (50 x 0.1 s), not by computing a large image twice.
LEASE = {"FLUXSERVE_LEASE_S": "2", "FLUXSERVE_DEMO_STEP_DELAY_S": "0.1"}
SLOW = {"prompt": "slow", "num_inference_steps": 50, "aspect_ratio": "1:1", "megapixels": "0.25"}


def _feed(srv: RemoteServer, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{srv.url}/vmodel/feed/{job_id}", headers=srv.headers, timeout=10).json()  # type: ignore[no-any-return]


def _submit(srv: RemoteServer, inp: dict[str, Any]) -> str:
    resp = httpx.post(f"{srv.url}/vmodel/generate", json={"model": "flux-dev", "input": inp}, headers=srv.headers)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def _wait_running(srv: RemoteServer, job_id: str) -> None:
    wait_for(lambda: _feed(srv, job_id), lambda f: f["status"] == "processing" and f["progress"]["step"] >= 1)


def _wait_terminal(srv: RemoteServer, job_id: str, timeout: float = 180) -> dict[str, Any]:
    return wait_for(lambda: _feed(srv, job_id), lambda f: f["status"] in ("succeeded", "failed"), timeout=timeout)


def test_kill9_loses_no_job(tmp_path: Path, demo_model_dir: Path) -> None:
    srv = RemoteServer(tmp_path / "data", api_key=KEY, demo_model=demo_model_dir, env=LEASE).start()
    running = _submit(srv, SLOW)
    queued = [_submit(srv, {"prompt": f"queued {i}", "num_inference_steps": 2, "seed": i}) for i in range(3)]
    _wait_running(srv, running)
    assert all(_feed(srv, j)["status"] == "starting" for j in queued)
    srv.kill9()

    again = RemoteServer(tmp_path / "data", api_key=KEY, port=srv.port, env=LEASE).start()
    try:
        for job_id in [running, *queued]:
            feed = _wait_terminal(again, job_id)
            assert feed["status"] == "succeeded", feed
            assert len(feed["output"]) == 1
            assert httpx.get(feed["output"][0], timeout=10).status_code == 200
        assert f"job {running} re-queued: its worker" in again.log()
    finally:
        again.stop()


def test_job_that_kills_the_server_twice_fails_clearly(tmp_path: Path, demo_model_dir: Path) -> None:
    srv = RemoteServer(tmp_path / "data", api_key=KEY, demo_model=demo_model_dir, env=LEASE).start()
    job_id = _submit(srv, SLOW)
    for _ in range(2):
        _wait_running(srv, job_id)
        srv.kill9()
        srv = RemoteServer(tmp_path / "data", api_key=KEY, port=srv.port, env=LEASE).start()
    try:
        feed = _wait_terminal(srv, job_id, timeout=30)
        assert feed["status"] == "failed" and "2 times" in feed["error"]
        # The server still serves new work.
        assert _wait_terminal(srv, _submit(srv, {"prompt": "after", "num_inference_steps": 2}))["status"] == (
            "succeeded"
        )
    finally:
        srv.stop()
