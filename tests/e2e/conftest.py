from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import RemoteServer

E2E_KEY = "fs-e2e-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[RemoteServer]:
    with RemoteServer(tmp_path_factory.mktemp("server"), api_key=E2E_KEY, demo_model=demo_model_dir) as srv:
        yield srv
