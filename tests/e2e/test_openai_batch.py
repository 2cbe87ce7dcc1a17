"""OpenAI's Batch API over images with the real `openai` SDK (files.create, batches.create/retrieve/cancel/list,
files.content) against the real server, including a kill -9 mid-batch."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import E2E_KEY
from tests.support.server import RemoteServer

SLOW = {"FLUXSERVE_DEMO_STEP_DELAY_S": "0.1", "FLUXSERVE_LEASE_S": "2"}


def _client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=E2E_KEY, base_url=f"{server.url}/v1", max_retries=0, timeout=60)


def _line(custom_id: str, **body: Any) -> str:
    body = {"model": "flux-schnell", "prompt": f"line {custom_id}", "size": "256x256", **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/images/generations", "body": body})


def _batch(client: openai.OpenAI, lines: list[str], window: str = "24h") -> Any:
    uploaded = client.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
    assert uploaded.object == "file" and uploaded.purpose == "batch" and uploaded.bytes > 0
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/images/generations",  # type: ignore[arg-type]
        completion_window=window,  # type: ignore[arg-type]
        metadata={"run": "e2e"},
    )


def _until_done(client: openai.OpenAI, batch_id: str, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "expired", "cancelled", "failed"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
    return batch


def _lines(client: openai.OpenAI, file_id: str | None) -> dict[str, Any]:
    assert file_id is not None
    return {item["custom_id"]: item for item in map(json.loads, client.files.content(file_id).text.splitlines())}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Any:
    with RemoteServer(tmp_path_factory.mktemp("batch"), api_key=E2E_KEY, demo_model=demo_model_dir) as srv:
        yield srv


def test_a_batch_runs_every_good_line_and_files_the_bad_ones(server: RemoteServer) -> None:
    client = _client(server)
    lines = [
        _line("a", seed=1),
        _line("b", response_format="b64_json"),
        _line("c", size="1000x1000"),  # not a size FLUX makes
        "{not json",
        _line("a"),  # a custom_id used twice
        _line("d", n=2),
    ]
    created = _batch(client, lines)
    assert created.status in ("in_progress", "completed") and created.metadata == {"run": "e2e"}
    done = _until_done(client, created.id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 3, 3)
    out = _lines(client, done.output_file_id)
    assert set(out) == {"a", "b", "d"}
    assert out["a"]["response"]["status_code"] == 200 and out["a"]["response"]["body"]["data"][0]["seed"] == 1
    assert httpx.get(out["a"]["response"]["body"]["data"][0]["url"], timeout=10).status_code == 200
    assert out["b"]["response"]["body"]["data"][0]["b64_json"] and len(out["d"]["response"]["body"]["data"]) == 2
    errors = list(map(json.loads, client.files.content(done.error_file_id or "").text.splitlines()))
    assert len(errors) == 3 and {e["response"]["status_code"] for e in errors} == {400}
    assert any(e["custom_id"] == "c" and "size" in e["response"]["body"]["error"]["message"] for e in errors)
    listed = client.batches.list(limit=10)
    assert created.id in [b.id for b in listed.data]


def test_cancel_and_expiry_end_the_rest_of_a_batch(tmp_path: Path, demo_model_dir: Path) -> None:
    with RemoteServer(tmp_path / "slow", api_key=E2E_KEY, demo_model=demo_model_dir, env=SLOW) as srv:
        client = _client(srv)
        long = [_line(f"l{i}", model="flux-dev", steps=20) for i in range(4)]  # 2 s each
        canceled = _batch(client, long)
        time.sleep(0.5)
        after = client.batches.cancel(canceled.id)
        assert after.status in ("cancelling", "cancelled")
        ended = _until_done(client, canceled.id)
        assert ended.status == "cancelled"
        cancelled_lines = _lines(client, ended.error_file_id)
        assert any(line["error"] and line["error"]["code"] == "batch_cancelled" for line in cancelled_lines.values())
        expiring = _batch(client, long, window="1s")
        time.sleep(1.5)
        ended = _until_done(client, expiring.id)
        assert ended.status == "expired" and ended.expired_at is not None
        expired = _lines(client, ended.error_file_id)
        assert sum(1 for line in expired.values() if line["error"] and line["error"]["code"] == "batch_expired") >= 2


def test_a_batch_survives_a_kill_9(tmp_path: Path, demo_model_dir: Path) -> None:
    srv = RemoteServer(tmp_path / "data", api_key=E2E_KEY, demo_model=demo_model_dir, env=SLOW).start()
    try:
        client = _client(srv)
        created = _batch(client, [_line(f"k{i}", steps=4) for i in range(6)])
        time.sleep(1.0)  # some lines run, some wait
        srv.kill9()
        srv = RemoteServer(tmp_path / "data", api_key=E2E_KEY, port=srv.port, env=SLOW).start()
        done = _until_done(_client(srv), created.id)
        assert done.status == "completed" and done.request_counts is not None
        assert done.request_counts.completed == 6 and set(_lines(_client(srv), done.output_file_id)) == {
            f"k{i}" for i in range(6)
        }
    finally:
        srv.stop()
