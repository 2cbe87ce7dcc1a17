"""schemathesis against /openapi.json: every operation, its declared bodies, headers and queries
fuzzed over real HTTP (uvicorn on loopback, the fake engine); no answer may be a 5xx."""

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from fluxserve.app import create_app
from fluxserve.settings import Settings
from tests.conftest import API_KEY
from tests.support.fakes import FakeEngine
from tests.support.server import free_port


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data: Path = tmp_path_factory.mktemp("schemathesis")
    app = create_app(Settings(data_dir=data, api_key=API_KEY), engine=FakeEngine())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(10)


# The document only: building the app does no work until its lifespan starts (the fixture's server).
schema = schemathesis.openapi.from_dict(
    create_app(Settings(data_dir=Path("/nonexistent/schema-only"), api_key=API_KEY), engine=FakeEngine()).openapi()
)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_operation_answers_a_server_error(case: schemathesis.Case, served: str) -> None:
    response = case.call(base_url=served, headers={"Authorization": f"Bearer {API_KEY}", "x-key": API_KEY}, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
