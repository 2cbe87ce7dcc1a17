from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.settings import Settings
from tests.fakes import FakeEngine

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fluxserve.engine.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", api_key=API_KEY, port=8123)


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(settings: Settings, fake_engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=fake_engine)) as c:
        yield c


@pytest.fixture(scope="session")
def lora_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.loras_util import build_lora_dir

    return build_lora_dir(demo_model_dir, tmp_path_factory.mktemp("loras"))
