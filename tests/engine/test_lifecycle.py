"""Lazy loading (issue 34, first step): a server starts without loading weights, a name loads when its first
job runs, --preload loads names at start; the demo model through the real loading path."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fluxserve.app import build_registry, create_app, preloaded
from fluxserve.settings import Settings
from tests.conftest import API_KEY, AUTH
from tests.support.polling import wait_for

NAMES = ["flux-schnell", "flux-kontext-pro"]


def _settings(tmp_path: Path, demo_model_dir: Path, **extra: object) -> Settings:
    data = tmp_path / "data"
    (data / "demo-model").parent.mkdir(parents=True, exist_ok=True)
    (data / "demo-model").symlink_to(demo_model_dir, target_is_directory=True)
    return Settings(data_dir=data, api_key=API_KEY, demo=True, device="cpu", models=NAMES, **extra)


def _ready(client: TestClient) -> dict[str, object]:
    return wait_for(lambda: client.get("/health").json(), lambda h: h["status"] == "ready", timeout=120)


def _states(client: TestClient) -> dict[str, str]:
    return {m["id"]: m["state"] for m in client.get("/v1/models", headers=AUTH).json()["data"]}


def test_a_server_starts_without_weights_and_loads_a_name_for_its_first_job(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    with TestClient(create_app(_settings(tmp_path, demo_model_dir))) as client:
        assert _ready(client)["models"] == []  # ready to accept jobs, nothing loaded
        assert _states(client) == {"flux-schnell": "unloaded", "flux-kontext-pro": "unloaded"}
        made = client.post(
            "/v1/images/generations", json={"model": "flux-schnell", "prompt": "p", "size": "256x256"}, headers=AUTH
        )
        assert made.status_code == 200, made.text
        assert client.get("/health").json()["models"] == ["flux-schnell"]  # only what a job needed
        assert _states(client) == {"flux-schnell": "ready", "flux-kontext-pro": "unloaded"}


def test_preload_all_loads_every_name_at_start(tmp_path: Path, demo_model_dir: Path) -> None:
    with TestClient(create_app(_settings(tmp_path, demo_model_dir, preload=["all"]))) as client:
        assert sorted(_ready(client)["models"]) == sorted(NAMES)  # type: ignore[arg-type]
        assert set(_states(client).values()) == {"ready"}


def test_preload_names_must_be_served(tmp_path: Path, demo_model_dir: Path) -> None:
    settings = _settings(tmp_path, demo_model_dir, preload="flux-schnell,flux-fill")
    with pytest.raises(ValueError, match=r"--preload names unknown models \['flux-fill'\]"):
        preloaded(settings, build_registry(settings))
    assert preloaded(settings.model_copy(update={"preload": ["flux-schnell"]}), build_registry(settings)) == [
        "flux-schnell"
    ]
    compiled = settings.model_copy(update={"preload": [], "compile": True})
    assert preloaded(compiled, build_registry(settings)) is None  # --compile warms every name up at start


def _replicate(
    client: TestClient, headers: dict[str, str] | None = None, model: str = "flux-schnell"
) -> dict[str, object]:
    body = {"input": {"prompt": "a cat", "megapixels": "0.25", "num_inference_steps": 2}}
    made = client.post(f"/v1/models/black-forest-labs/{model}/predictions", json=body, headers=headers or AUTH)
    assert made.status_code == 201, made.text
    return made.json()  # type: ignore[no-any-return]


def _prediction(client: TestClient, pid: str, headers: dict[str, str] | None = None) -> dict[str, object]:
    return client.get(f"/v1/predictions/{pid}", headers=headers or AUTH).json()  # type: ignore[no-any-return]


def test_a_first_job_says_its_model_is_loading_and_memory_shows_everywhere(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    loopback = ("127.0.0.1", 50000)
    with TestClient(create_app(_settings(tmp_path, demo_model_dir)), client=loopback) as client:
        health = _ready(client)
        memory = health["engine"]["memory"]  # type: ignore[index]
        assert memory["used_bytes"] == 0 and memory["budget_bytes"] > 0
        sizes = {m["id"]: m["memory_bytes"] for m in client.get("/v1/models", headers=AUTH).json()["data"]}
        assert sizes["flux-schnell"] > 0 and sizes["flux-kontext-pro"] == sizes["flux-schnell"]  # same files
        pid = str(_replicate(client)["id"])
        done = wait_for(lambda: _prediction(client, pid), lambda p: p["status"] == "succeeded", timeout=120)
        logs = str(done["logs"]).splitlines()
        loading = [line for line in logs if line.startswith("loading flux-schnell: ")]
        assert loading and "KiB to read" in loading[0], logs
        assert logs.index(loading[0]) < logs.index("step 1/2")
        used = client.get("/health").json()["engine"]["memory"]["used_bytes"]
        assert used >= sizes["flux-schnell"] * 0.9
        # Kontext's pipeline is the same weights: no second copy, nothing more read.
        text = client.get("/metrics").text
        assert 'fluxserve_model_loads_total{model="flux-schnell"} 1.0' in text
        assert "fluxserve_model_load_seconds_count 1.0" in text
        assert f'fluxserve_memory_used_bytes{{device="cpu"}} {float(used)}' in text
        assert 'fluxserve_model_state{device="cpu",model="flux-schnell",state="ready"} 1.0' in text
        # A second job for a loaded model has no loading line.
        again = str(_replicate(client)["id"])
        second = wait_for(lambda: _prediction(client, again), lambda p: p["status"] == "succeeded", timeout=120)
        assert not [line for line in str(second["logs"]).splitlines() if line.startswith("loading")]


def test_sleep_and_wake_are_for_admin_keys_and_jobs_wait_meanwhile(tmp_path: Path, demo_model_dir: Path) -> None:
    from fluxserve.auth import create_key

    settings = _settings(tmp_path, demo_model_dir, preload=["flux-schnell"])
    with TestClient(create_app(settings)) as client:
        _ready(client)
        store = client.app.state.services.store  # type: ignore[attr-defined]
        user = {"Authorization": f"Bearer {create_key(store, 'user').key}"}
        admin = {"Authorization": f"Bearer {create_key(store, 'ops', admin=True).key}"}
        for method, path in (("post", "/sleep"), ("post", "/wake_up"), ("get", "/is_sleeping")):
            refused = client.request(method, path, headers=user)
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"]["code"] == "admin_key_required"
        assert client.get("/is_sleeping").status_code == 401
        assert client.get("/is_sleeping", headers=admin).json() == {"is_sleeping": False}
        assert client.post("/sleep", headers=admin).json() == {"is_sleeping": True}
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["sleeping"] is True
        assert health.json()["models"] == [] and health.json()["engine"]["memory"]["used_bytes"] == 0
        pid = str(_replicate(client, user)["id"])  # accepted while asleep
        time.sleep(2.5)
        assert _prediction(client, pid, user)["status"] == "starting"  # still queued
        assert client.post("/wake_up", headers=AUTH).json() == {"is_sleeping": False}  # the operator's key too
        wait_for(lambda: _prediction(client, pid, user), lambda p: p["status"] == "succeeded", timeout=120)
        assert client.get("/health").json()["sleeping"] is False
        assert "flux-schnell" in client.get("/health").json()["models"]


@pytest.mark.parametrize("max_wait", [60.0, 0.0])
def test_alternating_jobs_run_warm_first_within_the_wait_bound(
    tmp_path: Path, demo_model_dir: Path, max_wait: float
) -> None:
    """A, B, A, B, A, B under a budget for one pipeline: the worker runs the jobs for what it has loaded first
    (two loads, not six); with --max-model-wait 0 the fair order holds and every switch is a load."""
    from fluxserve.engine.inventory import inventory
    from fluxserve.models.demo import demo_weights

    folders = [demo_weights(demo_model_dir, kind) for kind in ("text2img", "flux2")]
    budget = max(sum(p.nbytes for p in inventory(str(f), 4) or []) for f in folders) + 10_000  # one at a time
    settings = _settings(
        tmp_path, demo_model_dir, demo_step_delay_s=0.15, memory_budget=str(budget), max_model_wait_s=max_wait
    ).model_copy(update={"models": ["flux-schnell", "flux-2-klein-4b"]})
    loopback = ("127.0.0.1", 50000)
    with TestClient(create_app(settings), client=loopback) as client:
        _ready(client)
        order = ["flux-schnell", "flux-2-klein-4b"] * 3
        ids = [str(_replicate(client, model=m)["id"]) for m in order]
        done = [
            wait_for(lambda i=i: _prediction(client, i), lambda p: p["status"] == "succeeded", timeout=120) for i in ids
        ]
        ran = [order[ids.index(str(p["id"]))] for p in sorted(done, key=lambda p: str(p["started_at"]))]
        text = client.get("/metrics").text
        counted = [line for line in text.splitlines() if line.startswith("fluxserve_model_loads_total{")]
        loads = sum(float(line.split()[-1]) for line in counted)
        if max_wait:
            assert ran == ["flux-schnell"] * 3 + ["flux-2-klein-4b"] * 3 and loads == 2
        else:
            assert ran == order and loads == 6
        memory = client.get("/health").json()["engine"]["memory"]
        assert memory["used_bytes"] <= memory["budget_bytes"]


def test_warm_first_keeps_the_fair_order_once_a_cold_job_waited_too_long() -> None:
    from fluxserve.queue.local import warm_first

    queued = [("b1", "B", None, 100.0), ("a1", "A", None, 101.0), ("b2", "B", None, 102.0), ("a2", "A", None, 103.0)]
    assert warm_first(queued, ["A"], 30.0, now=110.0) == ["a1", "a2", "b1", "b2"]
    assert warm_first(queued, ["A"], 30.0, now=130.0) == ["b1", "a1", "b2", "a2"]  # b1 has waited 30 s
    assert warm_first(queued, [], 30.0, now=110.0) == ["b1", "a1", "b2", "a2"]
    assert warm_first(queued, ["A"], 0.0, now=110.0) == ["b1", "a1", "b2", "a2"]  # 0: no preference
