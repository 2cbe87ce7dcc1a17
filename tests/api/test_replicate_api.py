"""Replicate's predictions API over the HTTP and job layers (FakeEngine)."""

import base64
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from fluxserve.api import replicate
from fluxserve.app import create_app
from fluxserve.settings import Settings
from tests.conftest import AUTH
from tests.support.fakes import FakeEngine
from tests.support.images_util import png_bytes
from tests.support.polling import wait_for
from tests.support.webhook_receiver import Received, webhook_receiver

SCHNELL = "/v1/models/black-forest-labs/flux-schnell/predictions"
DEV = "/v1/models/black-forest-labs/flux-dev/predictions"


def _get(client: TestClient, pid: str) -> dict[str, Any]:
    return client.get(f"/v1/predictions/{pid}", headers=AUTH).json()  # type: ignore[no-any-return]


def _wait(
    client: TestClient, pid: str, statuses: tuple[str, ...] = ("succeeded", "failed", "canceled", "aborted")
) -> dict[str, Any]:
    return wait_for(lambda: _get(client, pid), lambda body: body["status"] in statuses, interval=0.02)


@pytest.fixture
def slow() -> FakeEngine:
    return FakeEngine(step_s=0.1)


@pytest.fixture
def slow_client(settings: Settings, slow: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=slow)) as c:
        yield c


def test_create_is_201_with_the_full_prediction(client: TestClient) -> None:
    resp = client.post(SCHNELL, json={"input": {"prompt": "a cat", "num_outputs": 2}}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    p = resp.json()
    assert {
        "id",
        "model",
        "version",
        "input",
        "output",
        "logs",
        "error",
        "status",
        "created_at",
        "started_at",
        "completed_at",
        "metrics",
        "urls",
    } <= set(p)
    assert p["model"] == "black-forest-labs/flux-schnell" and p["input"] == {"prompt": "a cat", "num_outputs": 2}
    assert p["status"] in ("starting", "processing", "succeeded")
    assert set(p["urls"]) == {"get", "cancel", "stream"}
    done = _wait(client, p["id"])
    assert done["status"] == "succeeded" and len(done["output"]) == 2
    assert done["output"][0].split("?")[0].endswith(".webp")
    assert done["metrics"]["predict_time"] >= 0 and done["completed_at"].endswith("Z")
    assert "step 4/4" in done["logs"]


def test_output_shape_per_model(client: TestClient) -> None:
    for name, is_list in [
        ("flux-dev", True),
        ("flux-pro", False),
        ("flux-1.1-pro", False),
        ("flux-kontext-max", False),
    ]:
        resp = client.post(
            f"/v1/models/black-forest-labs/{name}/predictions",
            json={"input": {"prompt": "p"}},
            headers={**AUTH, "Prefer": "wait"},
        )
        assert resp.status_code == 201, resp.text
        assert resp.json()["status"] == "succeeded"
        assert isinstance(resp.json()["output"], list) is is_list, name


def test_version_form_and_custom_size(client: TestClient, fake_engine: FakeEngine) -> None:
    body = {
        "version": "black-forest-labs/flux-pro",
        "input": {"prompt": "p", "aspect_ratio": "custom", "width": 1440, "height": 256},
    }
    resp = client.post("/v1/predictions", json=body, headers={**AUTH, "Prefer": "wait=30"})
    assert resp.status_code == 201 and resp.json()["status"] == "succeeded"
    spec = fake_engine.last_spec
    # flux-pro's steps and guidance come from the registry, as in every dialect.
    assert (spec.width, spec.height, spec.steps, spec.guidance) == (1440, 256, 40, 3.5)


@pytest.mark.parametrize(
    ("inp", "field"),
    [
        ({}, "input.prompt"),
        ({"prompt": "p", "num_outputs": 5}, "input.num_outputs"),
        ({"prompt": "p", "num_inference_steps": 5}, "input.num_inference_steps"),
        ({"prompt": "p", "aspect_ratio": "7:3"}, "input.aspect_ratio"),
        ({"prompt": "p", "output_format": "gif"}, "input.output_format"),
        ({"prompt": "p", "output_quality": 101}, "input.output_quality"),
        ({"prompt": "p", "megapixels": "2"}, "input.megapixels"),
        ({"prompt": "p", "go_fast": "yes"}, "input.go_fast"),
    ],
)
def test_bad_schnell_fields_are_422_naming_them(client: TestClient, inp: dict[str, Any], field: str) -> None:
    resp = client.post(SCHNELL, json={"input": inp}, headers=AUTH)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["status"] == 422 and body["title"] == "Input validation failed"
    assert field.removeprefix("input.") in body["detail"] or field in body["detail"]
    assert body["invalid_fields"][0]["field"] == field


def test_bad_requests_per_model(client: TestClient) -> None:
    pro = "/v1/models/black-forest-labs/flux-pro/predictions"
    for inp, field in [
        ({"prompt": "p", "width": 1000, "aspect_ratio": "custom", "height": 512}, "input.width"),
        ({"prompt": "p", "aspect_ratio": "custom"}, "input.width"),
        ({"prompt": "p", "guidance": 11}, "input.guidance"),
        ({"prompt": "p", "image_prompt": "http://x"}, "input.image_prompt"),
    ]:
        resp = client.post(pro, json={"input": inp}, headers=AUTH)
        assert resp.status_code == 422 and resp.json()["invalid_fields"][0]["field"] == field, resp.text
    kontext = "/v1/models/black-forest-labs/flux-kontext-pro/predictions"
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    resp = client.post(
        kontext, json={"input": {"prompt": "p", "input_image": data_url, "safety_tolerance": 5}}, headers=AUTH
    )
    assert resp.status_code == 422 and "safety_tolerance" in resp.json()["detail"]
    assert client.post("/v1/models/someone/else/predictions", json={"input": {}}, headers=AUTH).status_code == 404
    assert (
        client.post("/v1/models/black-forest-labs/sdxl/predictions", json={"input": {}}, headers=AUTH).status_code
        == 404
    )
    resp = client.post(
        "/v1/predictions", json={"version": "stability/sdxl:abc", "input": {"prompt": "p"}}, headers=AUTH
    )
    assert resp.status_code == 422 and resp.json()["invalid_fields"][0]["field"] == "version"
    for prefer in ("wait=0", "wait=61", "wait=abc"):
        resp = client.post(SCHNELL, json={"input": {"prompt": "p"}}, headers={**AUTH, "Prefer": prefer})
        assert resp.status_code == 422, prefer
    resp = client.post(SCHNELL, json={"input": {"prompt": "p"}}, headers={**AUTH, "Cancel-After": "soon"})
    assert resp.status_code == 422 and "Cancel-After" in resp.json()["detail"]
    assert client.post(SCHNELL, json={"input": {"prompt": "p"}}).status_code == 401
    assert client.post(SCHNELL, json={"input": {"prompt": "p"}}).json()["title"] == "Unauthenticated"


def test_cancel_queued_never_runs_and_running_stops(slow_client: TestClient, slow: FakeEngine) -> None:
    first = slow_client.post(
        "/v1/models/black-forest-labs/flux-dev/predictions",
        json={"input": {"prompt": "long", "num_inference_steps": 50}},
        headers=AUTH,
    ).json()
    queued = slow_client.post(SCHNELL, json={"input": {"prompt": "never"}}, headers=AUTH).json()
    _wait(slow_client, first["id"], ("processing",))
    canceled = slow_client.post(f"/v1/predictions/{queued['id']}/cancel", headers=AUTH)
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert slow_client.post(f"/v1/predictions/{first['id']}/cancel", headers=AUTH).status_code == 200
    stopped = _wait(slow_client, first["id"])
    assert stopped["status"] == "canceled" and stopped["output"] is None and stopped["error"] is None
    assert stopped["progress"]["current"] < 50  # stopped at its next step, not after 50
    nxt = slow_client.post(SCHNELL, json={"input": {"prompt": "next"}}, headers={**AUTH, "Prefer": "wait=10"}).json()
    assert nxt["status"] == "succeeded"  # the worker is free again
    assert all(r.spec.prompt != "never" for call in slow.calls for r in call)


def test_cancel_after_stops_a_running_job_at_its_deadline(slow_client: TestClient) -> None:
    """Cancel-After's floor is 5 s (replicate.com's): a 5 s job that starts 2 s in, asked to end within 5 s,
    is stopped then. The queued case (aborted before it starts) is tested with fal's X-Fal-Request-Timeout
    (test_hosted_2026.py)."""
    blocker = slow_client.post(DEV, json={"input": {"prompt": "b", "num_inference_steps": 20}}, headers=AUTH)
    assert blocker.status_code == 201  # 2 s before the next starts
    running = slow_client.post(
        DEV, json={"input": {"prompt": "r", "num_inference_steps": 50}}, headers={**AUTH, "Cancel-After": "5s"}
    ).json()
    assert running["deadline"] is not None
    ended = _wait(slow_client, running["id"])
    assert ended["status"] in ("canceled", "aborted") and ended["progress"]["current"] < 50


def test_prefer_wait_returns_early_when_not_done(slow_client: TestClient) -> None:
    t0 = time.time()
    resp = slow_client.post(
        DEV, json={"input": {"prompt": "p", "num_inference_steps": 40}}, headers={**AUTH, "Prefer": "wait=1"}
    )
    assert time.time() - t0 >= 0.9  # it held the call for the second asked for, then answered unfinished
    assert resp.status_code == 201 and resp.json()["status"] in ("starting", "processing")


def test_list_pages(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicate, "PAGE_SIZE", 2)
    ids = [client.post(SCHNELL, json={"input": {"prompt": f"p{i}"}}, headers=AUTH).json()["id"] for i in range(5)]
    seen: list[str] = []
    url: str | None = "/v1/predictions"
    while url:
        page = client.get(url.removeprefix("http://127.0.0.1:8123"), headers=AUTH).json()
        assert set(page) == {"next", "previous", "results"} and len(page["results"]) <= 2
        seen += [r["id"] for r in page["results"]]
        url = page["next"]
    assert seen == ids[::-1]
    assert client.get("/v1/predictions?cursor=garbage", headers=AUTH).status_code == 422


def test_idempotency_key(client: TestClient) -> None:
    headers = {**AUTH, "Idempotency-Key": "abc-1"}
    a = client.post(SCHNELL, json={"input": {"prompt": "same"}}, headers=headers).json()
    b = client.post(SCHNELL, json={"input": {"prompt": "same"}}, headers=headers).json()
    assert a["id"] == b["id"]
    other = client.post(SCHNELL, json={"input": {"prompt": "different"}}, headers=headers)
    assert other.status_code == 409
    c = client.post(SCHNELL, json={"input": {"prompt": "same"}}, headers={**AUTH, "Idempotency-Key": "abc-2"}).json()
    assert c["id"] != a["id"]


def test_other_dialects_jobs_are_not_predictions(client: TestClient) -> None:
    vm = client.post("/vmodel/generate", json={"model": "flux", "input": {"prompt": "p"}}, headers=AUTH).json()
    assert client.get(f"/v1/predictions/{vm['id']}", headers=AUTH).status_code == 404


def test_webhooks_signed_filtered_and_retried(settings: Settings, fake_engine: FakeEngine) -> None:
    local = settings.model_copy(update={"allow_private_urls": True, "webhook_retry_base_s": 0.05})
    with TestClient(create_app(local, engine=fake_engine)) as client:
        secret = client.get("/v1/webhooks/default/secret", headers=AUTH).json()["key"]
        assert secret.startswith("whsec_")
        got = Received(secret=secret, fail_first=2)
        with webhook_receiver(got) as url:
            body = {"input": {"prompt": "hook"}, "webhook": url, "webhook_events_filter": ["completed"]}
            pid = client.post(SCHNELL, json=body, headers=AUTH).json()["id"]
            deadline = time.time() + 10
            while not got.deliveries and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)
        assert got.bad_signatures == 0 and got.attempts == 3  # two 500s, then delivered
        assert len(got.deliveries) == 1
        delivered = got.deliveries[0]["body"]
        assert delivered["id"] == pid and delivered["status"] == "succeeded" and len(delivered["output"]) == 1

        everything = Received(secret=secret)
        with webhook_receiver(everything) as url:
            pid = client.post(SCHNELL, json={"input": {"prompt": "all"}, "webhook": url}, headers=AUTH).json()["id"]
            deadline = time.time() + 10
            while time.time() < deadline and not any(d["body"]["status"] == "succeeded" for d in everything.deliveries):
                time.sleep(0.02)
        statuses = [d["body"]["status"] for d in everything.deliveries]
        assert statuses[0] == "processing" and statuses[-1] == "succeeded"


def test_private_webhooks_refused_by_default(client: TestClient) -> None:
    for url in ("http://127.0.0.1:9/hook", "http://10.0.0.1/hook", "file:///etc/passwd"):
        resp = client.post(SCHNELL, json={"input": {"prompt": "p"}, "webhook": url}, headers=AUTH)
        assert resp.status_code == 422 and resp.json()["invalid_fields"][0]["field"] == "webhook", resp.text


def test_sse_stream(settings: Settings) -> None:
    import httpx_sse

    engine = FakeEngine(step_s=0.02)
    with TestClient(create_app(settings, engine=engine)) as client:
        p = client.post(
            "/v1/models/black-forest-labs/flux-dev/predictions",
            json={"input": {"prompt": "s", "num_inference_steps": 5}},
            headers=AUTH,
        ).json()
        events: list[tuple[str, str]] = []
        with httpx_sse.connect_sse(
            client, "GET", p["urls"]["stream"].removeprefix("http://127.0.0.1:8123"), headers=AUTH
        ) as source:
            for sse in source.iter_sse():
                events.append((sse.event, sse.data))
        names = [e for e, _ in events]
        assert names[-1] == "done" and "output" in names
        assert [d for e, d in events if e == "logs"][-1] == "step 5/5"
        assert next(d for e, d in events if e == "output").startswith("http://127.0.0.1:8123/files/")


def test_openai_streaming_partial_images(client: TestClient) -> None:
    import httpx_sse

    body = {"prompt": "s", "model": "flux-dev", "steps": 6, "size": "256x256", "stream": True, "partial_images": 2}
    with httpx_sse.connect_sse(client, "POST", "/v1/images/generations", json=body, headers=AUTH) as source:
        events = [sse.json() for sse in source.iter_sse()]
    types = [e["type"] for e in events]
    assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e["partial_image_index"] for e in events[:2]] == [0, 1]
    assert all(e["b64_json"] and e["size"] == "256x256" for e in events)
    assert "usage" in events[-1]
    _ = httpx  # the SSE client runs on httpx


def test_jobs_without_webhooks_cost_the_webhook_thread_one_read(settings: Settings) -> None:
    import threading

    with TestClient(create_app(settings, engine=FakeEngine(step_s=0.02))) as client:
        store = client.app.state.services.store  # type: ignore[attr-defined]
        real_get = store.get_job
        reads: list[str] = []

        def counting_get(job_id: str, **kw: Any) -> Any:
            reads.append(threading.current_thread().name)
            return real_get(job_id, **kw)

        store.get_job = counting_get
        body = {"input": {"prompt": "no hook", "num_inference_steps": 20}}
        created = client.post("/v1/models/black-forest-labs/flux-dev/predictions", json=body, headers=AUTH)
        job_id = created.json()["id"]
        deadline = time.time() + 10
        while client.get(f"/v1/predictions/{job_id}", headers=AUTH).json()["status"] != "succeeded":
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.2)
        # 22 events (start, 20 steps, output, completed); the first read shows there is no webhook.
        assert reads.count("fluxserve-webhooks") <= 2, reads


def test_cancel_of_a_running_prediction_answers_canceled_at_once(settings: Settings) -> None:
    engine = FakeEngine(step_s=0.2)
    with TestClient(create_app(settings, engine=engine)) as client:
        p = client.post(
            "/v1/models/black-forest-labs/flux-dev/predictions",
            json={"input": {"prompt": "s", "num_inference_steps": 30}},
            headers=AUTH,
        ).json()
        deadline = time.time() + 20
        while client.get(f"/v1/predictions/{p['id']}", headers=AUTH).json()["status"] != "processing":
            assert time.time() < deadline
            time.sleep(0.02)
        canceled = client.post(f"/v1/predictions/{p['id']}/cancel", headers=AUTH).json()
        assert canceled["status"] == "canceled"  # what the client will see from now on
        assert client.get(f"/v1/predictions/{p['id']}", headers=AUTH).json()["status"] == "canceled"
        while client.get(f"/v1/predictions/{p['id']}", headers=AUTH).json()["completed_at"] is None:
            assert time.time() < deadline
            time.sleep(0.05)
        final = client.get(f"/v1/predictions/{p['id']}", headers=AUTH).json()
        assert final["status"] == "canceled" and final["output"] is None


def test_unmatched_replicate_routes_answer_as_replicate(client: TestClient) -> None:
    for method, path, status in [
        ("GET", "/v1/deployments/me/x", 404),
        ("GET", "/v1/models/black-forest-labs/flux-dev/examples", 404),
        ("DELETE", "/v1/predictions", 405),
        ("PUT", "/v1/models/black-forest-labs/flux-dev", 405),
    ]:
        resp = client.request(method, path, headers=AUTH)
        assert resp.status_code == status, (path, resp.text)
        assert resp.headers["content-type"] == "application/problem+json" and resp.json()["status"] == status
    # The OpenAI model list stays OpenAI's.
    assert client.get("/v1/models", headers=AUTH).json()["object"] == "list"


def test_model_and_version_objects_and_a_pinned_version(client: TestClient) -> None:
    model = client.get("/v1/models/black-forest-labs/flux-schnell", headers=AUTH).json()
    version = model["latest_version"]
    assert model["owner"] == "black-forest-labs" and len(version["id"]) == 64
    inputs = version["openapi_schema"]["components"]["schemas"]["Input"]
    assert inputs["properties"]["num_inference_steps"]["maximum"] == 4  # schnell's, from the registry
    listed = client.get("/v1/models/black-forest-labs/flux-schnell/versions", headers=AUTH).json()
    assert [v["id"] for v in listed["results"]] == [version["id"]]
    one = client.get(f"/v1/models/black-forest-labs/flux-schnell/versions/{version['id']}", headers=AUTH)
    assert one.status_code == 200 and one.json()["id"] == version["id"]
    wrong = client.get("/v1/models/black-forest-labs/flux-schnell/versions/abc", headers=AUTH)
    assert wrong.status_code == 404 and wrong.json()["status"] == 404
    for path in ("/v1/models/someone/flux-dev", "/v1/models/black-forest-labs/nope"):
        missing = client.get(path, headers=AUTH)
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    pinned = client.post("/v1/predictions", json={"version": version["id"], "input": {"prompt": "p"}}, headers=AUTH)
    assert pinned.status_code == 201 and pinned.json()["model"] == "black-forest-labs/flux-schnell"
    assert client.get("/v1/models/black-forest-labs/flux-dev", headers={}).status_code == 401


def test_the_stream_url_is_a_signed_capability(settings: Settings) -> None:
    import httpx_sse

    with TestClient(create_app(settings, engine=FakeEngine(step_s=0.01))) as client:
        p = client.post(SCHNELL, json={"input": {"prompt": "s"}}, headers=AUTH).json()
        url = p["urls"]["stream"].removeprefix("http://127.0.0.1:8123")
        assert "sig=" in url and "expires=" in url
        with httpx_sse.connect_sse(client, "GET", url) as source:  # no token, as replicate-js opens it
            events = [(sse.event, sse.id) for sse in source.iter_sse()]
        assert events[-1][0] == "done" and all(event_id for _, event_id in events)
        assert len({event_id for _, event_id in events}) == len(events)
        forged = client.get(url.replace("sig=", "sig=0"))
        assert forged.status_code == 403 and forged.json()["status"] == 403
        expired = client.get(url.split("expires=")[0] + "expires=1&sig=" + url.split("sig=")[1])
        assert expired.status_code == 403
        assert client.get(url.split("?")[0]).status_code == 401


def test_an_idle_webhook_sender_sleeps_yet_sends_a_retry_when_it_is_due(
    settings: Settings, fake_engine: FakeEngine
) -> None:
    """Issue 38: with nothing due the sender sleeps up to IDLE_S (5 s) instead of reading the outbox every
    0.5 s, yet a retry due in 1 s goes out then, not at its next look."""
    local = settings.model_copy(update={"allow_private_urls": True, "webhook_retry_base_s": 1.0})
    with TestClient(create_app(local, engine=fake_engine)) as client:
        store = client.app.state.services.store  # type: ignore[attr-defined]
        looks: list[float] = []
        due = store.due_deliveries

        def counted(*args: Any, **kwargs: Any) -> Any:
            looks.append(time.monotonic())
            return due(*args, **kwargs)

        store.due_deliveries = counted
        time.sleep(0.6)  # past the start-up look
        looks.clear()
        time.sleep(2.0)
        assert len(looks) <= 1, looks  # at 0.5 s a poll would have looked 4 times
        got = Received(fail_first=1)
        with webhook_receiver(got) as url:
            body = {"input": {"prompt": "hook"}, "webhook": url, "webhook_events_filter": ["completed"]}
            client.post(SCHNELL, json=body, headers=AUTH)
            deadline = time.time() + 10
            while got.attempts < 1 and time.time() < deadline:
                time.sleep(0.01)
            failed_at = time.monotonic()
            while not got.deliveries and time.time() < deadline:
                time.sleep(0.01)
            retried_after = time.monotonic() - failed_at
        assert got.attempts == 2 and len(got.deliveries) == 1
        assert 0.5 <= retried_after < 3.0, retried_after  # due 1 s after the failure, not at a 5 s idle look
