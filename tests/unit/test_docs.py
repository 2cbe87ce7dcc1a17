"""The documentation against the code: the generated references cover every flag and setting, the module map
names every module (and nothing else), the README stays a landing page, the benchmark plots come from the JSON."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer.main

from fluxserve.cli import app
from fluxserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "fluxserve"


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _command(*path: str) -> Any:
    """A command of the Typer app (Typer vendors its own click: read by attributes)."""
    cmd: Any = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _options(cmd: Any) -> list[str]:
    return [p.opts[0] for p in cmd.params if p.param_type_name == "option" and p.name != "help"]


def test_the_cli_reference_has_every_option_of_every_command(hooks: ModuleType) -> None:
    text = hooks.cli_reference()
    for path in (("serve",), ("worker",), ("keys", "create"), ("mcp",), ("generate",)):
        section = text.split(f"## `fluxserve {' '.join(path)}`")[1].split("\n## ")[0]
        for flag in _options(_command(*path)):
            assert f"`{flag}`" in section, (path, flag)
    assert "`FLUXSERVE_API_KEY`" in text.split("## `fluxserve mcp`")[1]  # envvars shown


def test_the_configuration_reference_has_every_setting_and_variable(hooks: ModuleType) -> None:
    text = hooks.config_reference()
    for name in Settings.model_fields:
        row = next((line for line in text.split("\n") if line.startswith(f"| `{name}` |")), None)
        assert row is not None, name
        assert f"`FLUXSERVE_{name.upper()}`" in row or "FLUXSERVE_" in row, row
    for command in ("serve", "worker"):
        missing = [flag for flag in _options(_command(command)) if f"`{flag}`" not in text]
        assert missing in ([], ["--upstreams-only"]), (command, missing)  # a worker switch, not a setting


def test_the_http_reference_lists_every_route_of_the_app(hooks: ModuleType) -> None:
    doc = hooks.openapi()
    text = hooks.http_reference(doc)
    for path, item in doc["paths"].items():
        for method in item:
            assert f"| `{method.upper()}` | `{path}` |" in text


def test_the_benchmark_section_is_made_from_the_json(hooks: ModuleType, tmp_path: Path) -> None:
    run = tmp_path / "cpu-2030-01-01"
    run.mkdir()
    rows = [{"mode": "plain", "end_to_end_s": 2.0}, {"mode": "fast", "end_to_end_s": 1.25}]
    (run / "modes.json").write_text(json.dumps({"machine": "test box", "rows": rows}))
    markdown, pictures = hooks.bench_results(tmp_path)
    assert "Machine: test box." in markdown and "| `rows.fast.end_to_end_s` | 1.25 |" in markdown
    ((name, png),) = pictures.items()
    assert name == "assets/generated/cpu-2030-01-01-modes.png" and png.startswith(b"\x89PNG")
    assert f"]({name})" in markdown


def _map_entries() -> dict[str, str]:
    """The architecture page's module map: each top-level entry (a module or package/) and its text."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    block = next(b for b in page.split("```")[1::2] if b.startswith("\nsrc/fluxserve/"))
    entries: dict[str, str] = {}
    current = ""
    for line in block.strip("\n").split("\n")[1:]:
        m = re.match(r"^  (\S+)", line)
        if m:
            current = m.group(1)
            entries[current] = line[len(m.group(0)) :]
        else:
            entries[current] += " " + line.strip()
    return entries


def test_the_module_map_names_every_module_and_only_modules() -> None:
    entries = _map_entries()
    top = {p.name + ("/" if p.is_dir() else "") for p in SRC.iterdir() if p.name not in ("__pycache__", "__init__.py")}
    assert set(entries) == top
    for entry, text in entries.items():
        if not entry.endswith("/"):
            continue
        package = SRC / entry
        named = set(re.findall(r"\b([a-z_0-9]+\.(?:py|html|js|css))\b", text))
        present = {
            p.name
            for p in package.rglob("*")
            if p.is_file() and p.suffix in (".py", ".html", ".js", ".css") and "__pycache__" not in p.parts
        }
        assert named <= present, (entry, named - present)  # nothing named that isn't there
        assert present - {"__init__.py"} <= named, (entry, present - named - {"__init__.py"})  # nothing left out


def test_the_readme_is_a_landing_page_that_links_into_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.split("\n")) <= 300
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and all((ROOT / link).exists() for link in links), links
