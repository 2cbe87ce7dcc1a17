"""The lean read path (api/lean.py, issue 38): each dialect's poll answered without FastAPI's per-request
machinery, byte for byte what FastAPI answers, and only where the router would pick the same route."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from fluxserve.api.deps import OwnerDep, ServicesDep
from fluxserve.api.lean import LeanReads, lean, plans
from fluxserve.app import create_app
from fluxserve.settings import Settings
from tests.api.test_batches import _line, _upload
from tests.api.test_job_headers import FAL, _creates
from tests.conftest import API_KEY, AUTH
from tests.support.fakes import FakeEngine

HOST = "http://testserver"


def _lean(app: Any) -> LeanReads:
    layer = app.middleware_stack
    while not isinstance(layer, LeanReads):
        layer = layer.app
    return layer


@contextmanager
def _through_fastapi(app: Any) -> Iterator[None]:
    """The same app with the lean path taking nothing: every GET goes to FastAPI's router."""
    layer = _lean(app)
    saved, layer._plans = layer._plans, ()
    try:
        yield
    finally:
        layer._plans = saved


def _answered(
    client: TestClient, path: str, headers: dict[str, str], body: Any = None
) -> tuple[httpx.Response, httpx.Response, int]:
    """(lean answer, FastAPI's answer, how many requests the lean path answered); a POST of ``body`` when one
    is given (``bytes``: sent as they are), else a GET."""
    layer = _lean(client.app)
    answer, taken = layer._answer, []

    async def counted(*args: Any) -> None:
        taken.append(1)
        await answer(*args)

    def ask() -> httpx.Response:
        if body is None:
            return client.get(path, headers=headers)
        if isinstance(body, bytes):
            return client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
        return client.post(path, json=body, headers=headers)

    layer._answer = counted  # type: ignore[method-assign]
    try:
        first = ask()
    finally:
        del layer._answer
    with _through_fastapi(client.app):
        second = ask()
    return first, second, len(taken)


def _same(a: httpx.Response, b: httpx.Response, what: str) -> None:
    assert (a.status_code, a.content) == (b.status_code, b.content), (what, a.text[:300], b.text[:300])
    for header in ("content-type", "etag", "cache-control", "content-length", "access-control-expose-headers"):
        assert a.headers.get(header) == b.headers.get(header), (what, header)
    assert "edge;dur=" in a.headers.get("server-timing", "edge;dur=") and a.headers.get("x-request-id"), what


def _polls(client: TestClient, engine: FakeEngine) -> dict[str, tuple[str, dict[str, str]]]:
    """Each lean route's path for a job of its own dialect, with its dialect's key header. The jobs stay
    queued (the engine asleep) until the caller wakes it: two reads of one job then see the same job."""
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 256, "height": 256}, headers=AUTH).is_success
    engine.sleeping = True
    paths = {name: create() for name, create in _creates(client).items()}
    fal_status = paths["fal"].removeprefix(HOST)
    file_id = _upload(client, [_line(0, steps=2)])
    batch = client.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/images/generations"}, headers=AUTH
    )
    assert batch.status_code == 200, batch.text
    return {
        "/v1/predictions/{job_id}": (paths["replicate"], AUTH),
        "/v1/get_result": (paths["bfl"], {"x-key": API_KEY}),
        "/vmodel/feed/{job_id}": (paths["relay"], AUTH),
        "/fal-ai/{alias}/requests/{request_id}/status": (fal_status + "?logs=1", FAL),
        "/fal-ai/{alias}/requests/{request_id}": (fal_status.removesuffix("/status"), FAL),
        "/v1/images/tasks/{task_id}": (paths["openai"], AUTH),
        "/v1/batches/{batch_id}": (f"/v1/batches/{batch.json()['id']}", AUTH),
        "/sdapi/v1/progress": ("/sdapi/v1/progress?skip_current_image=true", AUTH),
    }


def test_every_lean_route_answers_what_fastapi_answers(client: TestClient, fake_engine: FakeEngine) -> None:
    polls = _polls(client, fake_engine)
    gets = {plan.route.path for plan in _lean(client.app)._plans if plan.route.methods == {"GET"}}
    assert gets == set(polls), "a route marked @lean needs a case here"
    for route, (path, headers) in polls.items():  # while the jobs wait
        for _ in range(5):  # the PostgreSQL queue has no sleep: a job may change between the two reads
            lean_answer, fastapi_answer, taken = _answered(client, path, headers)
            if lean_answer.content == fastapi_answer.content:
                break
        assert taken == 1, route
        _same(lean_answer, fastapi_answer, route)
    fake_engine.sleeping = False
    client.app.state.services.dispatcher.wake()  # type: ignore[attr-defined]
    _wait_until_all_ended(client)
    for route, (path, headers) in polls.items():  # once each is done: outputs, signed URLs, metrics
        lean_answer, fastapi_answer, taken = _answered(client, path, headers)
        assert (taken, lean_answer.status_code) == (1, 200), (route, lean_answer.text[:300])
        _same(lean_answer, fastapi_answer, route)
        etag = lean_answer.headers.get("etag")  # a job's read: its ETag holds on FastAPI's answer too
        if route in ("/v1/batches/{batch_id}", "/sdapi/v1/progress"):
            assert etag is None, route  # not a job's read
            continue
        with _through_fastapi(client.app):
            assert client.get(path, headers={**headers, "If-None-Match": etag}).status_code == 304, route


def _wait_until_all_ended(client: TestClient) -> None:
    store = client.app.state.services.store  # type: ignore[attr-defined]
    deadline = time.time() + 30
    while time.time() < deadline:
        with store.engine.connect() as conn:
            live = conn.exec_driver_sql("SELECT count(*) FROM jobs WHERE status IN ('queued', 'processing')")
            if live.scalar_one() == 0:
                return
        time.sleep(0.05)
    raise AssertionError("the jobs did not end within 30 s")


# Each lean create: its path, key header and a body. BFL's routes share one endpoint (one case covers them).
CREATES: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {
    "/v1/images/generations": ("/v1/images/generations", AUTH, {"model": "flux-schnell", "prompt": "p", "n": 1}),
    "/v1/models/{owner_name}/{name}/predictions": (
        "/v1/models/black-forest-labs/flux-dev/predictions",
        AUTH,
        {"input": {"prompt": "p", "num_inference_steps": 4}},
    ),
    "/v1/predictions": (
        "/v1/predictions",
        AUTH,
        {"version": "black-forest-labs/flux-schnell", "input": {"prompt": "p"}},
    ),
    "/v1/flux-dev": ("/v1/flux-dev", {"x-key": API_KEY}, {"prompt": "p", "width": 256, "height": 256}),
    "/vmodel/generate": ("/vmodel/generate", AUTH, {"model": "flux-schnell", "input": {"prompt": "p"}}),
    "/sdapi/v1/txt2img": ("/sdapi/v1/txt2img", AUTH, {"prompt": "p", "width": 256, "height": 256}),
    "/fal-ai/{app:path}": ("/fal-ai/flux/dev", FAL, {"prompt": "p", "image_size": "square"}),
    "/fal-run/fal-ai/{app:path}": ("/fal-run/fal-ai/flux/schnell", FAL, {"prompt": "p", "image_size": "square"}),
}


def _shape(value: Any) -> Any:
    """A JSON value with every string and number replaced by its type (ids, times and images differ per job)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return value if value is None or isinstance(value, bool) else type(value).__name__


def test_every_lean_create_answers_as_fastapi_does(client: TestClient) -> None:
    """The same status, headers and JSON shape either way (two jobs: ids, times and images differ)."""
    routes = [plan.route for plan in _lean(client.app)._plans if plan.route.methods == {"POST"}]
    covered = {r.endpoint.__code__ for r in routes if r.path in CREATES}
    assert all(r.endpoint.__code__ in covered for r in routes), "a create marked @lean needs a case here"
    for route, (path, headers, body) in CREATES.items():
        lean_answer, fastapi_answer, taken = _answered(client, path, headers, body)
        assert (taken, lean_answer.status_code) == (1, fastapi_answer.status_code), (route, lean_answer.text[:300])
        assert lean_answer.is_success, (route, lean_answer.text[:300])
        assert _shape(lean_answer.json()) == _shape(fastapi_answer.json()), route
        assert sorted(lean_answer.headers) == sorted(fastapi_answer.headers), route
        for header in ("content-type", "cache-control", "access-control-expose-headers", "x-ratelimit-limit"):
            assert lean_answer.headers.get(header) == fastapi_answer.headers.get(header), (route, header)


@pytest.mark.parametrize(
    ("path", "headers", "body"),
    [
        ("/v1/images/generations", AUTH, b"{not json"),
        ("/v1/images/generations", AUTH, {"model": "flux-schnell"}),  # no prompt
        ("/v1/images/generations", AUTH, {"model": "no-such-model", "prompt": "p"}),
        ("/v1/images/generations", {}, {"prompt": "p"}),  # no key
        ("/v1/images/generations", AUTH, {"prompt": "p", "size": "7x7"}),
        ("/v1/predictions", AUTH, {"input": {"prompt": "p"}}),  # no version
        ("/v1/models/someone/flux-dev/predictions", AUTH, {"input": {"prompt": "p"}}),
        ("/v1/models/black-forest-labs/flux-dev/predictions", AUTH, {"input": {"num_inference_steps": "x"}}),
        ("/v1/flux-dev", {"x-key": "wrong-key-0123456789"}, {"prompt": "p"}),
        ("/v1/flux-dev", {"x-key": API_KEY}, {"prompt": "p", "width": 1}),
        ("/bfl/v1/flux-dev", {"x-key": API_KEY}, [1, 2]),  # under the relay's provider prefix
        ("/vmodel/generate", AUTH, {"model": "flux-schnell"}),
        ("/sdapi/v1/txt2img", {"Authorization": "Basic eDp5"}, {"prompt": "p"}),
        ("/fal-ai/flux/dev", FAL, {"prompt": "p", "image_size": "enormous"}),
        ("/fal-run/fal-ai/no/such/app", FAL, {"prompt": "p"}),
    ],
)
def test_a_refused_create_is_the_same_envelope_either_way(
    client: TestClient, path: str, headers: dict[str, str], body: Any
) -> None:
    lean_answer, fastapi_answer, taken = _answered(client, path, headers, body)
    assert taken == 1 and lean_answer.status_code >= 400, lean_answer.text[:300]
    _same(lean_answer, fastapi_answer, path)


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/predictions/nope", AUTH),  # unknown id: Replicate's problem+json 404
        ("/v1/predictions/nope", {}),  # no key: 401
        ("/v1/predictions/nope", {"Authorization": "Bearer wrong-key-0123456789"}),
        ("/v1/get_result?id=nope", {"x-key": API_KEY}),  # BFL's own 404 body
        ("/bfl/v1/get_result?id=nope", {"x-key": API_KEY}),  # under the relay's provider prefix
        ("/v1/get_result", {"x-key": API_KEY}),
        ("/vmodel/feed/nope", AUTH),
        ("/fal-ai/flux/dev/requests/nope/status?logs=maybe", FAL),  # a bool FastAPI refuses: its 422
        ("/fal-ai/flux/dev/requests/nope/status?logs=TRUE", FAL),
        ("/v1/images/tasks/nope", {"Authorization": "Basic eDp5"}),
        ("/v1/batches/nope", AUTH),
        ("/sdapi/v1/progress?skip_current_image=2", AUTH),
    ],
)
def test_errors_are_the_same_envelope_either_way(client: TestClient, path: str, headers: dict[str, str]) -> None:
    lean_answer, fastapi_answer, _ = _answered(client, path, headers)
    assert lean_answer.status_code >= 400
    _same(lean_answer, fastapi_answer, path)


def test_a_lean_answer_is_logged_and_counted_under_its_route(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(create_app(settings, engine=FakeEngine()), client=("127.0.0.1", 50000)) as client:
        path = _creates(client)["replicate"]()
        create = "/v1/models/{owner_name}/{name}/predictions"
        with caplog.at_level(logging.INFO, logger="fluxserve.request"):
            _, _, taken = _answered(client, path, AUTH)
            _, _, created = _answered(client, *CREATES[create])
        metrics = client.get("/metrics").text
    assert (taken, created) == (1, 1)
    lines = [r.getMessage() for r in caplog.records if r.name == "fluxserve.request"]
    assert [line.split()[1] for line in lines] == ["/v1/predictions/{job_id}"] * 2 + [create] * 2, lines
    assert 'route="/v1/predictions/{job_id}"' in metrics and f'route="{create}"' in metrics


def test_the_router_keeps_a_path_an_earlier_route_answers_first() -> None:
    """A literal route declared before a lean one wins its path, as it does in FastAPI's router; a method or
    a query the lean path cannot read goes on to the router too."""
    router = APIRouter()
    calls: list[str] = []

    @router.get("/things/special")
    async def special() -> dict[str, str]:
        calls.append("special")
        return {"which": "special"}

    @router.get("/things/{thing_id}")
    @lean
    async def thing(thing_id: str, flag: bool = False) -> dict[str, Any]:
        calls.append("thing")
        return {"which": thing_id, "flag": flag, "text": "é\u2028"}

    app = FastAPI()
    app.add_middleware(LeanReads, plans=plans([*app.routes, *router.routes]))
    app.include_router(router)
    with TestClient(app) as c:
        assert c.get("/things/special").json() == {"which": "special"}
        assert c.get("/things/x?flag=yes").json() == {"which": "x", "flag": True, "text": "é\u2028"}
        assert c.get("/things/x?flag=2").status_code == 422  # FastAPI's validation, not a guess
        assert c.head("/things/x").status_code in (200, 405)
    assert calls == ["special", "thing"]  # the 422 and the HEAD never reached the endpoint
    layer, answered = _lean(app), []
    answer = layer._answer

    async def counted(*args: Any) -> None:
        answered.append(args[0].route.path)
        await answer(*args)

    layer._answer = counted  # type: ignore[method-assign]
    with TestClient(app, root_path="/behind") as c:  # a proxy's prefix: matched without it, as the router does
        assert c.get("/behind/things/y").json()["which"] == "y"
        assert c.get("/other/things/y").status_code == 404
    assert calls == ["special", "thing", "thing"] and answered == ["/things/{thing_id}"]
    (plan,) = _lean(app)._plans
    assert plan.prefix == "/things/"  # a path without it is never matched against the route's pattern
    assert plan.route.path == "/things/{thing_id}"
    assert [getattr(r, "path", None) for r in plan.shadows] == ["/things/special"]


def test_a_route_the_lean_path_cannot_answer_fails_when_the_app_is_built() -> None:
    router = APIRouter()

    @router.get("/things/{thing_id}")
    @lean
    async def thing(thing_id: int, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
        return {}

    @router.put("/other")
    @lean
    async def other(services: ServicesDep) -> dict[str, Any]:
        return {}

    @router.post("/bare")
    @lean
    async def bare(services: ServicesDep):  # type: ignore[no-untyped-def]  # no response field to encode by
        return {}

    with pytest.raises(TypeError, match="thing_id"):
        plans(router.routes[:1])
    with pytest.raises(TypeError, match="plain GETs or POSTs"):
        plans(router.routes[1:2])
    with pytest.raises(TypeError, match="plain GETs or POSTs"):
        plans(router.routes[2:])
