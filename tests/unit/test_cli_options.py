"""The serve and worker options come from Settings: help, defaults, env names and the reference agree."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from fluxserve.cli import app
from fluxserve.cli.options import SERVE_FIELDS, WORKER_FIELDS, env_name, flag, settings_options
from fluxserve.settings import Settings

runner = CliRunner()


def _help(command: str) -> str:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return re.sub(r"\s+", " ", result.output)


@pytest.mark.parametrize(("command", "fields"), [("serve", SERVE_FIELDS), ("worker", WORKER_FIELDS)])
def test_every_option_shows_its_setting_env_and_default(command: str, fields: tuple[str, ...]) -> None:
    text = _help(command)
    for name in fields:
        field = Settings.model_fields[name]
        assert flag(name) in text, name
        assert f"env {env_name(name)})" in text, name
        assert field.description and field.description in text, name
    # Defaults survive as written (Rich markup used to swallow "[127.0.0.1]").
    if command == "serve":
        assert "(default 127.0.0.1; env FLUXSERVE_HOST)" in text
        assert "--model-config" in text and "env FLUXSERVE_MODEL_CONFIG" in text
        assert "--database" in text and "env FLUXSERVE_DATABASE_URL" in text


def test_the_reference_lists_every_setting_once() -> None:
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0
    rows = [line for line in result.output.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(Settings.model_fields)
    assert all(Settings.model_fields[row.split("`")[1]].description for row in rows)
    assert "| `port` | `--port` | `FLUXSERVE_PORT` | `8000` |" in result.output
    assert "| `secret` |  | `FLUXSERVE_SECRET` |" in result.output  # no flag: secrets stay off command lines


def test_flags_given_win_and_absent_ones_leave_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    @settings_options(("port", "models", "demo"))
    def command(overrides: dict[str, object]) -> None:
        seen.update(overrides)

    monkeypatch.setenv("FLUXSERVE_PORT", "9000")
    command(port=8123, models="a,b", demo=None)
    assert seen == {"port": 8123, "models": "a,b"}
    assert Settings(**seen).models == ["a", "b"]


def test_a_bad_flag_value_is_refused_naming_it() -> None:
    result = runner.invoke(app, ["serve", "--offload", "sideways"])
    assert result.exit_code == 2
    assert "offload" in result.output


def test_list_settings_read_from_the_environment_as_the_docs_write_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # Comma-separated, as the reference shows (pydantic-settings alone wants JSON and fails with a traceback).
    monkeypatch.setenv("FLUXSERVE_MODELS", "flux-dev, flux-schnell")
    monkeypatch.setenv("FLUXSERVE_PRELOAD", "flux-dev")
    monkeypatch.setenv("FLUXSERVE_CORS_ORIGINS", '["https://a.example", "https://b.example"]')  # JSON too
    settings = Settings()
    assert settings.models == ["flux-dev", "flux-schnell"] and settings.preload == ["flux-dev"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    monkeypatch.setenv("FLUXSERVE_MODELS", "[not json")
    result = runner.invoke(app, ["serve", "--port", "1"])
    assert result.exit_code == 2 and "models" in result.output and "Traceback" not in result.output, result.output
