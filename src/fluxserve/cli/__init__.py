"""The `fluxserve` command: serve, worker, db, keys, usage, generate, config, demo-model."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from . import keys, mcp_bridge, tools
from .common import app, check_engine_installed, check_fp8, open_store, settings_from
from .options import SERVE_FIELDS, WORKER_FIELDS, settings_options

__all__ = ["app", "keys", "main", "mcp_bridge", "tools"]


@app.command()
@settings_options(SERVE_FIELDS)
def serve(overrides: dict[str, Any]) -> None:
    """Start the HTTP server (with its own workers, unless --api-only)."""
    import uvicorn

    from ..app import create_app
    from ..auth import create_key
    from ..http_protocol import header_deadline_protocol
    from ..logs import configure as configure_logging

    settings = settings_from(**overrides)
    if settings.api_only and not settings.on_postgres:
        typer.echo("fluxserve: --api-only needs a shared PostgreSQL database (--database postgresql://...)", err=True)
        raise typer.Exit(2)
    if not settings.api_only:
        check_engine_installed()
    elif not (settings.storage or "").startswith("s3://"):
        typer.echo(
            f"Storage is the folder {settings.storage or settings.outputs_dir}: every API node and worker "
            "must see this same folder (or use --storage s3://bucket/prefix)."
        )
    if settings.quantize == "fp8":
        check_fp8(settings)
    configure_logging(settings.log_format)
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # keys, secrets, images: owner-only
    store = open_store(settings.database)
    if not settings.api_key and store.count_keys() == 0:
        key = create_key(store, "default")
        typer.echo(f"Created the first API key (shown once; `fluxserve keys create` makes more):\n\n    {key.key}\n")
    store.close()
    if settings.demo:
        typer.echo("Demo mode: every model name is served by the demo model (random weights, images are noise).")
    # fluxserve logs each request itself (with its id, without query strings, which carry URL signatures).
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        log_config=None,
        http=header_deadline_protocol(settings.header_timeout_s),
    )


@app.command()
@settings_options(WORKER_FIELDS)
def worker(
    overrides: dict[str, Any],
    upstreams_only: Annotated[
        bool, typer.Option("--upstreams-only", help="Only upstream-provider workers: no GPU, no torch.")
    ] = False,
) -> None:
    """A GPU worker: loads its models, then runs the jobs queued for them, from any API node.
    With --upstreams-only: the jobs routed to upstream providers, many at once, and no device.

    SIGTERM: the running job may finish (FLUXSERVE_SHUTDOWN_GRACE_S), queued ones stay; a second
    SIGTERM gives the running job back to the queue now."""
    import asyncio

    from ..app import build_core, store_options
    from ..logs import configure as configure_logging
    from ..queue.pg.runner import WORKER_POOL, install_stop_signals

    settings = settings_from(**overrides)
    if not settings.on_postgres:
        typer.echo("fluxserve: worker needs the shared PostgreSQL database (--database postgresql://...)", err=True)
        raise typer.Exit(2)
    if not upstreams_only:
        check_engine_installed()
    if settings.quantize == "fp8" and not upstreams_only:
        check_fp8(settings)
    configure_logging(settings.log_format)
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # demo model, compile cache, LoRA cache
    # Upstream slots each write their job's events and leases: a pool that grows with them.
    pool = {"pool_size": 8, "pool_overflow": 8} if upstreams_only else {"pool_size": WORKER_POOL, "pool_overflow": 0}
    core = build_core(settings, open_store(settings.database, role="worker", **pool, **store_options(settings)))
    # procrastinate's task returns only once the images are stored: no overlapped encoding.
    workers = [] if upstreams_only else core.device_workers(settings, overlap_encoding=False)
    workers += core.upstream_workers(settings)
    if not workers:
        typer.echo("fluxserve: nothing to run: no local model and no upstream any model routes to", err=True)
        raise typer.Exit(2)

    async def main() -> int:
        stop, stop_now = asyncio.Event(), asyncio.Event()
        install_stop_signals(stop, stop_now)
        return await core.queue.run_workers(workers, stop, stop_now)

    try:
        code = asyncio.run(main())
    finally:
        core.close()
    raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
