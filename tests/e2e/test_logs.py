"""The real server's logs: JSON lines per request (with its id) and per job transition; no secrets."""

import json
from pathlib import Path

import httpx

from tests.support.server import RemoteServer

KEY = "fs-log-test-key-0123456789"


def test_json_request_and_job_lines_without_secrets(tmp_path: Path, demo_model_dir: Path) -> None:
    srv = RemoteServer(
        tmp_path / "data", api_key=KEY, demo_model=demo_model_dir, env={"FLUXSERVE_LOG_FORMAT": "json"}
    ).start()
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        resp = httpx.post(
            f"{srv.url}/v1/images/generations",
            json={"prompt": "logged", "size": "256x256", "steps": 1},
            headers={**auth, "x-request-id": "req-abc.123"},
            timeout=120,
        )
        assert resp.status_code == 200 and resp.headers["x-request-id"] == "req-abc.123"
        url = resp.json()["data"][0]["url"]
        assert "sig=" in url and httpx.get(url).status_code == 200
        fresh = httpx.get(f"{srv.url}/v1/models", headers={**auth, "x-request-id": "bad id with spaces"})
        generated = fresh.headers["x-request-id"]
        assert generated != "bad id with spaces" and len(generated) == 16
    finally:
        srv.stop()
    text = srv.log()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    requests = [r for r in lines if r.get("logger") == "fluxserve.request"]
    create = next(r for r in requests if r.get("request_id") == "req-abc.123")
    assert create["route"] == "/v1/images/generations" and create["status"] == 200 and create["ms"] > 0
    assert any(r.get("request_id") == generated and r["route"] == "/v1/models" for r in requests)
    assert any(r["route"] == "/files/{key:path}" and r["status"] == 200 for r in requests)
    events = [r["event"] for r in lines if r.get("logger") == "fluxserve.jobs" and "event" in r]
    assert events[:3] == ["submitted", "started", "succeeded"]
    assert KEY not in text and "sig=" not in text and "logged" not in text  # no key, signature or prompt
    assert "falling back" not in text  # transformers' notices about torchvision-less image processors
