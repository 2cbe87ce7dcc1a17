"""The real-weights path: TOML model config, local folders, hub ids under local_files_only."""

from pathlib import Path

from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.models import ModelRegistry
from fluxserve.models.demo import demo_weights
from fluxserve.settings import Settings
from tests.conftest import API_KEY, AUTH
from tests.support.polling import wait_for


def _toml(tmp_path: Path, weights: dict[str, str]) -> Path:
    cfg = tmp_path / "models.toml"
    cfg.write_text("".join(f'[models.{name}]\nweights = "{w}"\n' for name, w in weights.items()))
    return cfg


def _wait_state(client: TestClient, timeout: float = 60) -> dict:  # type: ignore[type-arg]
    return wait_for(lambda: client.get("/health").json(), lambda body: body["status"] != "loading", timeout=timeout)


def test_local_folder_from_model_config(tmp_path: Path, demo_model_dir: Path) -> None:
    # Every name the demo can serve here (FLUX 3's need torchvision), each pointed at its demo folder.
    weights = {
        m.name: str(demo_weights(demo_model_dir, m.kind, ModelRegistry.default().get(m.name).weights))
        for m in ModelRegistry.demo(demo_model_dir)
    }
    cfg = _toml(tmp_path, weights)
    settings = Settings(
        data_dir=tmp_path / "d",
        api_key=API_KEY,
        model_config_file=cfg,
        offline=True,
        device="cpu",
        models=list(weights),
    )
    with TestClient(create_app(settings)) as client:
        assert _wait_state(client)["status"] == "ready"
        models = client.get("/v1/models", headers=AUTH).json()["data"]
        assert all(m["demo"] for m in models)  # a demo folder is labelled demo wherever it is configured
        resp = client.post(
            "/v1/images/generations",
            json={"model": "flux-dev", "prompt": "p", "size": "256x256", "steps": 2},
            headers=AUTH,
        )
        assert resp.status_code == 200, resp.text


def test_hub_id_offline_fails_its_jobs_clearly_and_the_server_serves_the_rest(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    """Offline, a hub id that is not in the cache is not a broken server: its jobs fail at once naming the
    weights to fetch; a name whose weights are here serves."""
    local = str(demo_weights(demo_model_dir, "text2img"))
    cfg = _toml(tmp_path, {"flux-schnell": "black-forest-labs/FLUX.1-schnell", "flux-dev": local})
    settings = Settings(
        data_dir=tmp_path / "d",
        api_key=API_KEY,
        model_config_file=cfg,
        offline=True,
        device="cpu",
        models=["flux-schnell", "flux-dev"],
    )
    with TestClient(create_app(settings)) as client:
        health = _wait_state(client)
        assert health["status"] == "ready" and client.get("/health").status_code == 200
        assert "FLUX.1-schnell" in health["engine"]["unavailable"]["flux-schnell"]
        resp = client.post("/v1/images/generations", json={"model": "flux-schnell", "prompt": "p"}, headers=AUTH)
        assert resp.status_code == 500
        message = resp.json()["error"]["message"]
        assert "black-forest-labs/FLUX.1-schnell" in message and "not in the hub cache" in message
        assert "huggingface-cli download black-forest-labs/FLUX.1-schnell" in message
        ok = client.post(
            "/v1/images/generations",
            json={"model": "flux-dev", "prompt": "p", "size": "256x256", "steps": 2},
            headers=AUTH,
        )
        assert ok.status_code == 200, ok.text
