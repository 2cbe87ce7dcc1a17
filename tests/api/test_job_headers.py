"""Polls are cheap to repeat (issue 38): every dialect's job read carries an ETag, answers If-None-Match with
304 while the job is unchanged, says Cache-Control: no-store, and (as every synchronous answer) Server-Timing
with the job's own stages."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from fluxserve.api.jobheaders import matches, server_timing
from fluxserve.app import create_app
from fluxserve.job import Job, Status
from fluxserve.settings import Settings
from fluxserve.spec import GenerationSpec
from tests.conftest import AUTH
from tests.support.fakes import FakeEngine

FAL = {"Authorization": AUTH["Authorization"].replace("Bearer", "Key")}


@pytest.fixture
def slow_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=FakeEngine(step_s=0.2))) as c:
        yield c


def _creates(client: TestClient) -> dict[str, Callable[[], str]]:
    """Each dialect: create a job without waiting, and return the path its clients poll."""

    def replicate() -> str:
        body = {"input": {"prompt": "p", "num_inference_steps": 4}}
        job = client.post("/v1/models/black-forest-labs/flux-dev/predictions", json=body, headers=AUTH).json()
        return f"/v1/predictions/{job['id']}"

    def bfl() -> str:
        job = client.post("/v1/flux-dev", json={"prompt": "p", "width": 256, "height": 256}, headers=AUTH).json()
        return f"/v1/get_result?id={job['id']}"

    def relay() -> str:
        job = client.post("/vmodel/generate", json={"model": "flux-schnell", "input": {"prompt": "p"}}, headers=AUTH)
        return f"/vmodel/feed/{job.json()['id']}"

    def fal() -> str:
        return str(client.post("/fal-ai/flux/dev", json={"prompt": "p"}, headers=FAL).json()["status_url"])

    def openai() -> str:
        body = {"model": "flux-schnell", "prompt": "p", "size": "256x256"}
        task = client.post("/v1/images/generations", json=body, headers={**AUTH, "Prefer": "respond-async"}).json()
        return f"/v1/images/tasks/{task['id']}"

    return {"replicate": replicate, "bfl": bfl, "relay": relay, "fal": fal, "openai": openai}


def _headers(path: str) -> dict[str, str]:
    return FAL if "/requests/" in path else AUTH


def test_an_unchanged_job_is_304_in_every_dialects_poll(slow_client: TestClient) -> None:
    blocker = {"model": "flux-dev", "input": {"prompt": "blocker", "num_inference_steps": 50}}
    assert slow_client.post("/vmodel/generate", json=blocker, headers=AUTH).status_code == 200  # 10 s on the worker
    polls = {name: create() for name, create in _creates(slow_client).items()}  # queued behind it, unchanged
    for name, path in polls.items():
        path = path.removeprefix("http://127.0.0.1:8123").removeprefix("http://testserver")
        first = slow_client.get(path, headers=_headers(path))
        assert first.status_code in (200, 202), (name, first.text)
        etag = first.headers["etag"]
        assert first.headers["cache-control"] == "no-store", name
        assert "queue;dur=" in first.headers["server-timing"], name
        again = slow_client.get(path, headers={**_headers(path), "If-None-Match": etag})
        assert (again.status_code, again.content) == (304, b""), (name, again.status_code, again.text)
        assert again.headers["etag"] == etag
        other = slow_client.get(path, headers={**_headers(path), "If-None-Match": '"something-else"'})
        assert other.status_code == first.status_code and other.json() == first.json(), name


def test_a_changed_job_gets_a_new_etag_and_a_full_answer(slow_client: TestClient) -> None:
    body = {"model": "flux-dev", "input": {"prompt": "p", "num_inference_steps": 10}}
    job_id = slow_client.post("/vmodel/generate", json=body, headers=AUTH).json()["id"]
    first = slow_client.get(f"/vmodel/feed/{job_id}", headers=AUTH)
    deadline = time.time() + 30
    while time.time() < deadline:
        later = slow_client.get(f"/vmodel/feed/{job_id}", headers={**AUTH, "If-None-Match": first.headers["etag"]})
        if later.status_code == 200:
            break
        time.sleep(0.05)
    assert later.status_code == 200 and later.headers["etag"] != first.headers["etag"]
    assert later.json()["progress"] != first.json()["progress"] or later.json()["status"] != first.json()["status"]


def test_a_synchronous_answer_says_where_its_time_went(slow_client: TestClient) -> None:
    body = {"model": "flux-schnell", "prompt": "p", "size": "256x256", "response_format": "b64_json"}
    resp = slow_client.post("/v1/images/generations", json=body, headers=AUTH)
    assert resp.status_code == 200
    stages = dict(part.split(";dur=") for part in resp.headers["server-timing"].split(", "))
    assert set(stages) == {"queue", "gen", "encode", "edge"}
    assert float(stages["gen"]) >= 180  # the fake engine's steps: four of 0.2 s each
    assert float(stages["edge"]) >= float(stages["gen"])  # the node waited for all of it
    assert "etag" not in resp.headers  # a create is not a poll


def test_server_timing_of_a_routed_job_says_upstream_and_matches_is_rfc_9110() -> None:
    spec = GenerationSpec("flux-pro", "p", width=256, height=256, num_images=1, steps=4, guidance=None, seed=1)
    job = Job(id="j", owner="o", dialect="bfl", spec=spec, request={}, status=Status.SUCCEEDED, created_at=10.0)
    done = Job(**{**job.__dict__, "started_at": 12.0, "completed_at": 15.5, "route": "bfl", "encode_s": 0.5})
    expected = "queue;dur=2000.0, upstream;dur=3000.0, encode;dur=500.0, edge;dur=2.0"
    assert server_timing(done, 0.002, now=99.0) == expected
    assert server_timing(job, 0.001, now=99.0) == "edge;dur=1.0"  # ended before it started (canceled queued)
    assert matches('W/"a", "b"', '"b"') and matches("*", '"x"') and not matches('"a"', '"b"')


def test_a_replicate_create_says_its_queue_position_from_its_own_transaction(slow_client: TestClient) -> None:
    blocker = {"model": "flux-dev", "input": {"prompt": "blocker", "num_inference_steps": 50}}
    started = slow_client.post("/vmodel/generate", json=blocker, headers=AUTH)
    for _ in range(100):  # running, not queued: the positions below count only the jobs after it
        if slow_client.get(f"/vmodel/feed/{started.json()['id']}", headers=AUTH).json()["status"] == "processing":
            break
        time.sleep(0.05)
    body = {"input": {"prompt": "p", "num_inference_steps": 4}}
    path = "/v1/models/black-forest-labs/flux-dev/predictions"
    first = slow_client.post(path, json=body, headers=AUTH).json()
    second = slow_client.post(path, json=body, headers=AUTH).json()
    assert (first["status"], first["queue_position"]) == ("starting", 1)
    assert (second["status"], second["queue_position"]) == ("starting", 2)
    replay = slow_client.post(path, json=body, headers={**AUTH, "Idempotency-Key": "k1"}).json()
    again = slow_client.post(path, json=body, headers={**AUTH, "Idempotency-Key": "k1"}).json()
    assert again["id"] == replay["id"] and again["queue_position"] == replay["queue_position"] == 3
