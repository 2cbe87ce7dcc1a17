"""Command-line options generated from ``Settings``: each option's flag, type, help, default and environment
variable are read from the one field that declares it, so ``--help``, the environment names and the
configuration reference (``fluxserve config``) cannot drift from what the server reads."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic.fields import FieldInfo

from ..settings import ENV_PREFIX, Settings

# What marks and checks the images a process makes (serve and worker alike).
_OUTPUTS = (
    "provenance",
    "c2pa_cert",
    "c2pa_key",
    "provenance_prompt",
    "safety_model",
    "safety_threshold",
    "safety_max_tolerance",
)
# The Settings fields each command takes as flags (settings_options reads each one's flag, help, default, env).
SERVE_FIELDS = tuple(
    [
        "demo",
        "host",
        "port",
        "data_dir",
        "public_url",
        "model_config_file",
        "upstream_config_file",
        "allow_private_urls",
        "cors_origins",
        "models",
        "preload",
        "memory_budget",
        "cpu_memory_budget",
        "idle_unload_s",
        "max_model_wait_s",
        "lora_dir",
        "lora_slots",
        "lora_max_rank",
        "max_batch",
        "batch_max_pixels",
        "database_url",
        "device",
        "compile",
        "quantize",
        "attention",
        "cache",
        "offload",
        "vae_tiling",
        "api_only",
        "storage",
        *_OUTPUTS,
    ]
)
WORKER_FIELDS = tuple(
    [
        "database_url",
        "storage",
        "device",
        "models",
        "preload",
        "memory_budget",
        "cpu_memory_budget",
        "idle_unload_s",
        "max_model_wait_s",
        "demo",
        "data_dir",
        "model_config_file",
        "max_batch",
        "compile",
        "quantize",
        "offload",
        "lora_dir",
        "upstream_config_file",
        *_OUTPUTS,
    ]
)


def flag(name: str) -> str:
    extra = Settings.model_fields[name].json_schema_extra
    explicit = extra.get("flag") if isinstance(extra, dict) else None
    return str(explicit) if explicit else "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    alias = Settings.model_fields[name].validation_alias
    return alias if isinstance(alias, str) else ENV_PREFIX + name.upper()


def default_text(field: FieldInfo) -> str:
    """The default as a user would type it (lists comma-separated); '' when there is none."""
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def help_text(name: str) -> str:
    """Parentheses, not brackets: the help is rendered as plain text, and brackets read as markup elsewhere."""
    field = Settings.model_fields[name]
    default = default_text(field)
    shown = f"default {default}; " if default and field.annotation is not bool else ""
    return f"{field.description or ''} ({shown}env {env_name(name)})"


def _cli_type(annotation: Any) -> type:
    """The type typer parses: the field's own for scalars; str for lists (comma-separated, split by Settings)
    and literals (checked by Settings, naming what is allowed)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    if annotation in (bool, int, float, str, Path):
        return annotation  # type: ignore[no-any-return]
    return str


def settings_options(fields: Sequence[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command one option per named Settings field; the command receives the ones given as
    ``overrides`` (a dict of field name to value), and the rest come from the environment and defaults."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(command)
        params = [p for p in own.parameters.values() if p.name != "overrides"]
        for name in fields:
            field = Settings.model_fields[name]
            kind = _cli_type(field.annotation)
            option = typer.Option(flag(name), help=help_text(name), show_default=False)
            params.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
                )
            )

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            overrides = {name: kwargs.pop(name) for name in fields if kwargs.get(name) is not None}
            for name in fields:
                kwargs.pop(name, None)
            return command(**kwargs, overrides=overrides)

        run.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


def reference(flagged: set[str]) -> str:
    """Every setting as a Markdown table: its flag (where a command takes one), environment variable, default
    and meaning."""
    rows = ["| setting | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = default_text(field).replace("|", "\\|")
        shown_flag = f"`{flag(name)}`" if name in flagged else ""
        rows.append(
            f"| `{name}` | {shown_flag} | `{env_name(name)}` | {f'`{default}`' if default else ''} | "
            f"{(field.description or '').replace('|', '/')} |"
        )
    return "\n".join(rows) + "\n"
