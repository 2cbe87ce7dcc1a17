from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.settings import Settings
from tests.support.fakes import FakeEngine

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fluxserve.engine.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--on-postgres", action="store_true", help="run the app-level tests on PostgreSQL + procrastinate")


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    extra = {}
    if request.config.getoption("--on-postgres"):
        # The same tests, with procrastinate dispatching to this process's queue worker.
        extra = {"database_url": request.getfixturevalue("pg_url"), "lease_s": 2.0, "shutdown_grace_s": 2.0}
    return Settings(data_dir=tmp_path / "data", api_key=API_KEY, port=8123, **extra)


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(settings: Settings, fake_engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=fake_engine)) as c:
        yield c


@pytest.fixture(scope="session")
def lora_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.loras_util import build_lora_dir

    return build_lora_dir(demo_model_dir, tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL server for this test session (tests/support/pg.py); a test that needs one fails without it."""
    from tests.support.pg import cluster

    with cluster() as base:
        yield base


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A fresh database on it, its schema applied as `fluxserve db upgrade` does."""
    from fluxserve.migrations import upgrade
    from fluxserve.store import Store
    from tests.support.pg import new_database

    url = new_database(pg_server)
    store = Store(url)
    try:
        upgrade(store.engine)
    finally:
        store.close()
    return url


@pytest.fixture(scope="session")
def s3_server() -> Iterator[object]:
    """A local S3-compatible server that checks presigned signatures and expiry (tests/support/s3.py)."""
    from tests.support.s3 import ministack

    with ministack() as server:
        yield server
