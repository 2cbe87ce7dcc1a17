"""The hosted APIs' December 2026 behaviours (issue 36): fal's status codes and request headers, Replicate's
Cancel-After floor."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.settings import Settings
from tests.conftest import API_KEY, AUTH
from tests.support.fakes import FakeEngine

FAL_KEY = {"Authorization": f"Key {API_KEY}"}
BASE = "http://127.0.0.1:8123"


@pytest.fixture
def slow_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=FakeEngine(step_s=0.1))) as c:
        yield c


def _status(client: TestClient, receipt: dict[str, str]) -> tuple[int, dict[str, str]]:
    resp = client.get(receipt["status_url"].removeprefix(BASE), headers=FAL_KEY)
    return resp.status_code, resp.json()


def test_fal_status_is_202_until_completed_then_200(slow_client: TestClient) -> None:
    receipt = slow_client.post("/fal-ai/flux/dev", json={"prompt": "p", "num_inference_steps": 10}, headers=FAL_KEY)
    code, body = _status(slow_client, receipt.json())
    assert code == 202 and body["status"] in ("IN_QUEUE", "IN_PROGRESS")
    deadline = time.time() + 30
    while body["status"] != "COMPLETED" and time.time() < deadline:
        time.sleep(0.1)
        code, body = _status(slow_client, receipt.json())
    assert (code, body["status"]) == (200, "COMPLETED")


def test_fal_request_timeout_cancels_a_request_that_did_not_start_in_time(slow_client: TestClient) -> None:
    blocker = {"prompt": "first", "num_inference_steps": 20}  # 2 s on the one worker
    assert slow_client.post("/fal-ai/flux/dev", json=blocker, headers=FAL_KEY).status_code == 200
    late = slow_client.post(
        "/fal-ai/flux/schnell", json={"prompt": "late"}, headers={**FAL_KEY, "X-Fal-Request-Timeout": "0.5"}
    ).json()
    deadline = time.time() + 30
    _, body = _status(slow_client, late)
    while body["status"] != "COMPLETED" and time.time() < deadline:
        time.sleep(0.1)
        _, body = _status(slow_client, late)
    assert body["error"] and "deadline" in body["error"]
    result = slow_client.get(late["response_url"].removeprefix(BASE), headers=FAL_KEY)
    assert result.status_code == 504 and result.headers["x-fal-request-timeout-type"] == "user"
    # The synchronous host answers the same way.
    blocker_again = slow_client.post("/fal-ai/flux/dev", json=blocker, headers=FAL_KEY)
    assert blocker_again.status_code == 200
    run = slow_client.post(
        "/fal-run/fal-ai/flux/schnell", json={"prompt": "late"}, headers={**FAL_KEY, "X-Fal-Request-Timeout": "0.5"}
    )
    assert run.status_code == 504 and run.headers["x-fal-request-timeout-type"] == "user"


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "99999999999"])
def test_a_bad_fal_request_timeout_is_a_422_naming_it(client: TestClient, value: str) -> None:
    resp = client.post("/fal-ai/flux/dev", json={"prompt": "p"}, headers={**FAL_KEY, "X-Fal-Request-Timeout": value})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"][-1] == "X-Fal-Request-Timeout"


@pytest.mark.parametrize(("value", "ok"), [("3s", False), ("4999ms", False), ("5s", True), ("1m", True)])
def test_replicate_cancel_after_below_5s_is_a_422_naming_it(client: TestClient, value: str, ok: bool) -> None:
    resp = client.post(
        "/v1/models/black-forest-labs/flux-schnell/predictions",
        json={"input": {"prompt": "p"}},
        headers={**AUTH, "Cancel-After": value},
    )
    if ok:
        assert resp.status_code == 201, resp.text
    else:
        assert resp.status_code == 422 and resp.json()["invalid_fields"][0]["field"] == "Cancel-After"


def _fal_job(client: TestClient, **headers: str) -> Any:
    receipt = client.post("/fal-ai/flux/schnell", json={"prompt": "p"}, headers={**FAL_KEY, **headers})
    assert receipt.status_code == 200, receipt.text
    job_id = receipt.json()["request_id"]
    services = client.app.state.services  # type: ignore[attr-defined]
    deadline = time.time() + 30
    while not (job := services.store.get_job(job_id)).status.is_terminal and time.time() < deadline:
        time.sleep(0.05)
    return job


@pytest.mark.parametrize(("operator", "asked", "kept"), [("7d", 60, 60.0), ("1h", 86400, 3600.0), ("0", 60, 60.0)])
def test_fal_lifecycle_preference_keeps_a_requests_files_for_less(
    settings: Settings, operator: str, asked: int, kept: float
) -> None:
    """X-Fal-Object-Lifecycle-Preference sets one request's retention, never past the operator's (0 there
    keeps files forever, yet a request may ask for less); the sweep deletes its files then, not the others'."""
    from fluxserve.retention import sweep

    settings = settings.model_copy(update={"retention": operator})
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        short = _fal_job(client, **{"X-Fal-Object-Lifecycle-Preference": f'{{"expiration_duration_seconds": {asked}}}'})
        plain = _fal_job(client)
        assert short.retain_s == kept and plain.retain_s is None
        if kept == settings.retention_s:  # bounded by the operator's: it goes with everything else
            return
        ended = short.completed_at
        assert sweep(services.store, services.storage, settings.retention_s, now=ended + kept - 5) == (0, 0)
        expired, _ = sweep(services.store, services.storage, settings.retention_s, now=ended + kept + 5)
        assert expired == 1
        assert services.store.get_job(short.id).files_expired_at is not None
        assert services.store.get_job(plain.id).files_expired_at is None
        result = client.get(f"/fal-ai/flux/requests/{short.id}", headers=FAL_KEY)
        assert (
            result.status_code in (404, 410, 422)
            or not client.get(result.json()["images"][0]["url"].removeprefix(BASE)).is_success
        )


@pytest.mark.parametrize(
    "value", ["60", "{}", '{"expiration_duration_seconds": -1}', '{"expiration_duration_seconds": "1h"}']
)
def test_a_bad_lifecycle_preference_is_a_422_naming_it(client: TestClient, value: str) -> None:
    resp = client.post(
        "/fal-ai/flux/dev", json={"prompt": "p"}, headers={**FAL_KEY, "X-Fal-Object-Lifecycle-Preference": value}
    )
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"][-1] == "X-Fal-Object-Lifecycle-Preference"
