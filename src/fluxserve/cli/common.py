"""The typer apps and what every command shares: settings from flags, the store, engine checks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..settings import Settings

# Plain help text: with Rich markup, a default written in brackets ("[127.0.0.1]") would vanish.
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help="fluxserve: a self-hosted server for FLUX image models.",
)
keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys.")
app.add_typer(keys_app, name="keys")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(db_app, name="db")

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="SQLite file, outputs, demo model [env FLUXSERVE_DATA_DIR].")
]


def settings_from(**overrides: Any) -> Settings:
    """Flags given on the command line win over the environment and the TOML file."""
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"]) or "settings"
            typer.echo(f"fluxserve: {where}: {err['msg']}", err=True)
        raise typer.Exit(2) from None


ENGINE_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors")


def check_engine_installed() -> None:
    """Without the engine extra, serve would start and sit in `error`: say what to install instead."""
    import importlib.util

    missing = [name for name in ENGINE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        typer.echo(
            f"fluxserve: serve needs the engine ({', '.join(missing)} not installed): install a torch build "
            "for your machine, then: pip install 'fluxserve[engine]'",
            err=True,
        )
        raise typer.Exit(2)


def check_fp8(settings: Settings) -> None:
    """Refuse fp8 on hardware without fp8 kernels before the server starts, not after it loads."""
    from ..app import devices
    from ..engine.loading import pick_device
    from ..engine.speed import check_fp8

    for device in devices(settings):
        try:
            check_fp8(pick_device(device))
        except RuntimeError as exc:
            typer.echo(f"fluxserve: quantize: {exc}", err=True)
            raise typer.Exit(2) from None


def open_store(url: str, **pool: Any) -> Any:
    """The store, its schema current (embedded SQLite is upgraded in place; others need `db upgrade`)."""
    from ..errors import StoreUnavailable
    from ..migrations import SchemaOutOfDate, open_store

    try:
        return open_store(url, **pool)
    except (SchemaOutOfDate, StoreUnavailable) as exc:
        typer.echo(f"fluxserve: database: {exc}", err=True)
        raise typer.Exit(2) from None


def store_at(data_dir: Path | None, database: str | None = None) -> Any:
    return open_store(settings_from(data_dir=data_dir, database_url=database).database)
