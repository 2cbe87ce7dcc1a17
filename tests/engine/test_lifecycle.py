"""Lazy loading (issue 34, first step): a server starts without loading weights, a name loads when its first
job runs, --preload loads names at start; the demo model through the real loading path."""

from __future__ import annotations

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
