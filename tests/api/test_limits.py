"""Per-key limits: 429 in each dialect's shape with Retry-After, x-ratelimit-* headers, counts in the database."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.auth import create_key
from fluxserve.errors import RateLimited
from fluxserve.limits import Limits, Usage, admit
from fluxserve.migrations import open_store
from fluxserve.settings import Settings
from tests.support.fakes import FakeEngine

SCHNELL = "/v1/models/black-forest-labs/flux-schnell/predictions"


def _key(settings: Settings, **limits: int) -> dict[str, str]:
    store = open_store(settings.database)
    new = create_key(store, "limited")
    store.set_key_limits(new.id, Limits(**limits))
    store.close()
    return {"Authorization": f"Bearer {new.key}", "x-key": new.key}


@pytest.fixture
def slow_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=FakeEngine(step_s=0.5))) as c:
        yield c


def test_max_queued_is_a_429_in_each_dialect_with_retry_after(settings: Settings, slow_client: TestClient) -> None:
    auth = _key(settings, max_queued=2)
    first = slow_client.post("/v1/flux-dev", json={"prompt": "a", "steps": 20}, headers=auth)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-queued"] == "2" and first.headers["x-ratelimit-remaining-queued"] == "1"
    second = slow_client.post(SCHNELL, json={"input": {"prompt": "b"}}, headers=auth)
    assert second.status_code == 201 and second.headers["x-ratelimit-remaining-queued"] == "0"

    bfl = slow_client.post("/v1/flux-dev", json={"prompt": "c"}, headers=auth)
    assert bfl.status_code == 429 and "2 jobs queued or running" in bfl.json()["detail"]
    rep = slow_client.post(SCHNELL, json={"input": {"prompt": "c"}}, headers=auth)
    assert rep.status_code == 429 and rep.json()["status"] == 429 and rep.json()["title"] == "Too many requests"
    oai = slow_client.post("/v1/images/generations", json={"prompt": "c"}, headers=auth)
    err = oai.json()["error"]
    assert oai.status_code == 429 and err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
    for resp in (bfl, rep, oai):
        assert int(resp.headers["Retry-After"]) >= 1 and resp.headers["x-ratelimit-remaining-queued"] == "0"
    # A refused create left nothing behind: still two jobs for this key.
    assert len(slow_client.get("/v1/predictions", headers=auth).json()["results"]) == 1  # the Replicate one
    # Another key is not affected.
    other = slow_client.post("/v1/flux-dev", json={"prompt": "d"}, headers=_key(settings))
    assert other.status_code == 200


def test_requests_per_minute_and_images_per_day(settings: Settings, client: TestClient) -> None:
    auth = _key(settings, rpm=3)
    remaining = []
    for _ in range(3):
        resp = client.post("/v1/images/generations", json={"prompt": "p", "size": "256x256"}, headers=auth)
        assert resp.status_code == 200, resp.text
        remaining.append(resp.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    over = client.post("/v1/images/generations", json={"prompt": "p", "size": "256x256"}, headers=auth)
    assert over.status_code == 429 and "3 requests per minute" in over.json()["error"]["message"]
    assert 1 <= int(over.headers["Retry-After"]) <= 60

    daily = _key(settings, images_per_day=5)
    ok = client.post("/v1/images/generations", json={"prompt": "p", "size": "256x256", "n": 4}, headers=daily)
    assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-images"] == "1"
    over = client.post("/v1/images/generations", json={"prompt": "p", "size": "256x256", "n": 2}, headers=daily)
    assert over.status_code == 429 and "5 images per day (UTC); 4 used" in over.json()["error"]["message"]
    assert int(over.headers["Retry-After"]) <= 86400
    assert client.post("/v1/images/generations", json={"prompt": "p", "size": "256x256"}, headers=daily).is_success


def test_defaults_apply_to_keys_without_their_own_and_zero_lifts_them(settings: Settings, tmp_path: Path) -> None:
    strict = settings.model_copy(update={"rpm_per_key": 1})
    unlimited = _key(strict, rpm=0)
    default = _key(strict)
    # Two app instances on one database file stand for two API nodes: the count is shared.
    with (
        TestClient(create_app(strict, engine=FakeEngine())) as node_a,
        TestClient(create_app(strict, engine=FakeEngine())) as node_b,
    ):
        assert node_a.post("/v1/flux-dev", json={"prompt": "a"}, headers=default).status_code == 200
        assert node_b.post("/v1/flux-dev", json={"prompt": "b"}, headers=default).status_code == 429
        for node in (node_a, node_b, node_a):
            resp = node.post("/v1/flux-dev", json={"prompt": "c"}, headers=unlimited)
            assert resp.status_code == 200 and "x-ratelimit-limit-requests" not in resp.headers


def test_admit_names_every_limit_hit_and_waits_for_the_longest() -> None:
    now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    usage = Usage(active=1, last_minute=10, oldest_in_minute=now - 45, images_today=3)
    assert admit(Limits(max_queued=5, rpm=20, images_per_day=10), usage, 2, now)["x-ratelimit-reset-requests"] == "15s"
    with pytest.raises(RateLimited) as err:
        admit(Limits(rpm=10, images_per_day=4), usage, 2, now)
    assert "10 requests per minute" in err.value.message and "4 images per day" in err.value.message
    assert err.value.retry_after == 16 * 3600  # until 00:00 UTC, the later of the two
