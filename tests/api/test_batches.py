"""The Batch API's queueing and refusals (the real SDK's round trips are tests/e2e/test_openai_batch.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.settings import Settings
from tests.conftest import AUTH
from tests.support.fakes import FakeEngine


@pytest.fixture
def slow_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=FakeEngine(step_s=0.05))) as c:
        yield c


def _upload(client: TestClient, lines: list[dict[str, object]]) -> str:
    data = "\n".join(json.dumps(line) for line in lines).encode()
    resp = client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", data)}, headers=AUTH)
    assert resp.status_code == 200 and resp.json()["object"] == "file", resp.text
    return str(resp.json()["id"])


def _line(i: int, steps: int = 10) -> dict[str, object]:
    body = {"model": "flux-dev", "prompt": f"b{i}", "size": "256x256", "steps": steps}
    return {"custom_id": f"c{i}", "method": "POST", "url": "/v1/images/generations", "body": body}


def test_an_interactive_job_is_never_queued_behind_a_batch(slow_client: TestClient) -> None:
    # About 0.5 s each on one worker; each its own step count, so no two share a pipeline call.
    file_id = _upload(slow_client, [_line(i, steps=10 + i) for i in range(5)])
    batch = slow_client.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/images/generations"}, headers=AUTH
    ).json()
    time.sleep(0.2)  # the first line is running
    t0 = time.monotonic()
    answer = slow_client.post("/v1/images/generations", json={"prompt": "now", "size": "256x256"}, headers=AUTH)
    waited = time.monotonic() - t0
    assert answer.status_code == 200
    assert waited < 2.0, waited  # behind the running line at most (~0.7 s), never behind the four queued (~2.5 s)
    store = slow_client.app.state.services.store  # type: ignore[attr-defined]
    lines = store.batch_jobs(batch["id"])
    assert len(lines) == 5 and all(j.batch_id == batch["id"] for j in lines)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"endpoint": "/v1/chat/completions"}, "endpoint"),
        ({"completion_window": "forever"}, "completion_window"),
        ({"input_file_id": "nope"}, "input_file_id"),
    ],
)
def test_bad_batch_requests_are_400s_naming_the_field(client: TestClient, body: dict[str, str], param: str) -> None:
    file_id = _upload(client, [_line(0)])
    full = {"input_file_id": file_id, "endpoint": "/v1/images/generations", **body}
    resp = client.post("/v1/batches", json=full, headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_a_file_for_another_purpose_or_an_unknown_batch_is_refused(client: TestClient) -> None:
    other = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("b.jsonl", b"{}")}, headers=AUTH)
    assert other.status_code in (400, 422) and "purpose" in other.text
    assert client.get("/v1/batches/batch_nope", headers=AUTH).status_code == 404
    assert client.post("/v1/batches/batch_nope/cancel", headers=AUTH).status_code == 404
    assert client.get("/v1/batches?limit=0", headers=AUTH).status_code == 400


def test_an_edits_batch_reads_its_lines_images_by_url(client: TestClient) -> None:
    import base64

    from tests.support.images_util import png_bytes

    image = "data:image/png;base64," + base64.b64encode(png_bytes((96, 64))).decode()
    body = {"model": "flux-kontext-pro", "prompt": "night", "steps": 2}
    lines = [
        {"custom_id": "one", "method": "POST", "url": "/v1/images/edits", "body": {**body, "image": image}},
        {
            "custom_id": "two",
            "method": "POST",
            "url": "/v1/images/edits",
            "body": {**body, "images": [{"image_url": image}]},
        },
        {"custom_id": "none", "method": "POST", "url": "/v1/images/edits", "body": body},
    ]
    file_id = _upload(client, lines)
    batch = client.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/images/edits"}, headers=AUTH
    ).json()
    deadline = time.monotonic() + 30
    while (batch := client.get(f"/v1/batches/{batch['id']}", headers=AUTH).json())["status"] != "completed":
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)
    assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    out = client.get(f"/v1/files/{batch['output_file_id']}/content", headers=AUTH).text.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in out) == ["one", "two"]
    store = client.app.state.services.store  # type: ignore[attr-defined]
    assert all(
        len(j.spec.images) == 1 and (j.spec.width, j.spec.height) == (1248, 832) for j in store.batch_jobs(batch["id"])
    )
    errors = client.get(f"/v1/files/{batch['error_file_id']}/content", headers=AUTH).text.splitlines()
    assert json.loads(errors[0])["response"]["body"]["error"]["code"] == "invalid_value"
