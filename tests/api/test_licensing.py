"""BFL self-hosted licence usage (issue 37): a succeeded local job of a licensed model writes its count in its
success's transaction; the reporter sends the counts in batches per slug with `x-key`, retries a failure under
the same Idempotency-Key, and never counts a job twice; `fluxserve usage --licensing` shows what was sent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fluxserve.app import create_app
from fluxserve.cli import app as cli
from fluxserve.models.licensing import parse_licensing
from fluxserve.settings import Settings
from tests.conftest import AUTH
from tests.support.fakes import FakeEngine
from tests.support.licence_server import LicenceState, licence_server
from tests.support.polling import wait_for

XKEY = {"x-key": AUTH["Authorization"].removeprefix("Bearer ")}


@pytest.fixture
def stub() -> Iterator[tuple[str, LicenceState]]:
    with licence_server() as served:
        yield served


def _config(tmp_path: Path, base: str, **extra: object) -> Path:
    lines = "\n".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in extra.items())
    path = tmp_path / "models.toml"
    path.write_text(
        f'[licensing.bfl]\nbase_url = "{base}"\nkey_env = "TEST_BFL_LICENSE"\n{lines}\n'
        '[licensing.bfl.models]\nflux-dev = "flux-1-dev"\nflux-fill = "flux-tools"\n'
    )
    return path


def _where(settings: Settings) -> list[str]:
    """The CLI's view of the server's database (PostgreSQL in CI's second round)."""
    return [
        "--data-dir",
        str(settings.data_dir),
        *(["--database", settings.database_url] if settings.database_url else []),
    ]


def _make(client: TestClient, model: str, n: int = 1) -> None:
    body = {"model": model, "prompt": "p", "n": n, "size": "256x256", "response_format": "b64_json"}
    assert client.post("/v1/images/generations", json=body, headers=AUTH).status_code == 200


def test_licensed_generations_are_reported_once_per_slug_with_the_key(
    settings: Settings, stub: tuple[str, LicenceState], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base, state = stub
    monkeypatch.setenv("TEST_BFL_LICENSE", "bfl-licence-key")
    settings.demo, settings.model_config_file = True, _config(tmp_path, base, interval_s=0.2)
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        _make(client, "flux-dev", n=2)
        _make(client, "flux-dev")
        _make(client, "flux-schnell")  # not a licensed name: not reported
        wait_for(lambda: state.total("flux-1-dev"), lambda n: n == 3, timeout=10)
        time.sleep(0.5)  # a further interval: nothing is sent again
    assert state.total("flux-1-dev") == 3 and "flux-tools" not in state.counted
    assert {r["key"] for r in state.received} == {"bfl-licence-key"}
    assert len({r["idempotency"] for r in state.received}) == len(state.received)
    report = CliRunner().invoke(cli, ["usage", "--licensing", *_where(settings)])
    assert report.exit_code == 0, report.output
    assert "flux-1-dev" in report.output and " 3 " in report.output


def test_a_failed_report_is_retried_under_the_same_key_and_counted_once(
    settings: Settings, stub: tuple[str, LicenceState], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base, state = stub
    state.fail_next = 2
    monkeypatch.setenv("TEST_BFL_LICENSE", "k")
    settings.demo, settings.model_config_file = True, _config(tmp_path, base, interval_s=0.2, lease_s=0.3)
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        _make(client, "flux-dev")
        wait_for(lambda: state.total("flux-1-dev"), lambda n: n == 1, timeout=15)
    assert len(state.received) == 3 and len({r["idempotency"] for r in state.received}) == 1
    assert state.total("flux-1-dev") == 1


def test_without_the_key_counts_wait_and_say_why(
    settings: Settings, stub: tuple[str, LicenceState], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base, state = stub
    monkeypatch.delenv("TEST_BFL_LICENSE", raising=False)
    settings.demo, settings.model_config_file = True, _config(tmp_path, base, interval_s=0.2)
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        _make(client, "flux-dev")
        time.sleep(0.6)
    assert state.received == []
    report = CliRunner().invoke(cli, ["usage", "--licensing", "--json", *_where(settings)])
    assert '"pending": 1' in report.output and "TEST_BFL_LICENSE is not set" in report.output


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[licensing.bfl.models]\nflux-nope = "flux-1-dev"', "not a model name here"),
        ('[licensing.bfl.models]\nflux-dev = "FLUX 1 dev"', "not a BFL model slug"),
        ('[licensing.bfl]\nbase = "x"\n[licensing.bfl.models]\nflux-dev = "flux-1-dev"', "unknown keys"),
        ("[licensing.bfl]\n", "give [licensing.bfl.models]"),
    ],
)
def test_a_bad_licensing_table_is_a_start_up_error(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(table)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        parse_licensing(path, {"flux-dev", "flux-schnell"})
