"""The `fluxserve` command: serve, keys, demo-model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .settings import Settings

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="fluxserve: a self-hosted server for FLUX image models."
)
keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys.")
app.add_typer(keys_app, name="keys")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(db_app, name="db")

UpstreamConfigOpt = Annotated[
    Path | None,
    typer.Option("--upstream-config", help="TOML: [upstreams.NAME] providers and the [models.NAME] routed to them."),
]
DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="SQLite file, outputs, demo model [env FLUXSERVE_DATA_DIR].")
]


def _settings(**overrides: Any) -> Settings:
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


def _check_engine_installed() -> None:
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


def _check_fp8(settings: Settings) -> None:
    """Refuse fp8 on hardware without fp8 kernels before the server starts, not after it loads."""
    from .app import devices
    from .engine.flux import pick_device
    from .engine.speed import check_fp8

    for device in devices(settings):
        try:
            check_fp8(pick_device(device))
        except RuntimeError as exc:
            typer.echo(f"fluxserve: quantize: {exc}", err=True)
            raise typer.Exit(2) from None


def _open_store(url: str, **pool: Any) -> Any:
    """The store, its schema current (embedded SQLite is upgraded in place; others need `db upgrade`)."""
    from .errors import StoreUnavailable
    from .migrations import SchemaOutOfDate, open_store

    try:
        return open_store(url, **pool)
    except (SchemaOutOfDate, StoreUnavailable) as exc:
        typer.echo(f"fluxserve: database: {exc}", err=True)
        raise typer.Exit(2) from None


def _store(data_dir: Path | None, database: str | None = None) -> Any:
    return _open_store(_settings(data_dir=data_dir, database_url=database).database)


@db_app.command("upgrade")
def db_upgrade(
    data_dir: DataDir = None,
    database: Annotated[str | None, typer.Option(help="SQLAlchemy URL [default: SQLite in the data dir].")] = None,
) -> None:
    """Bring the database schema to this version's (idempotent: applies only the missing steps)."""
    from .migrations import LATEST, upgrade
    from .store import Store

    settings = _settings(data_dir=data_dir, database_url=database)
    store = Store(settings.database)
    try:
        applied = upgrade(store.engine)
    finally:
        store.close()
    for step in applied:
        typer.echo(f"applied {step}")
    typer.echo(f"schema at version {LATEST}")


@app.command()
def serve(
    demo: Annotated[bool | None, typer.Option("--demo", help="Serve every model name with the demo model.")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address [default 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port [default 8000].")] = None,
    data_dir: DataDir = None,
    public_url: Annotated[str | None, typer.Option(help="Base of absolute URLs handed to clients.")] = None,
    model_config: Annotated[
        Path | None, typer.Option("--model-config", help="TOML file mapping model names to weights.")
    ] = None,
    upstream_config: UpstreamConfigOpt = None,
    allow_private_urls: Annotated[bool | None, typer.Option("--allow-private-urls")] = None,
    cors_origins: Annotated[str | None, typer.Option(help="Allowed browser origins, comma-separated.")] = None,
    models: Annotated[
        str | None, typer.Option(help="Model names to serve, comma-separated [default: all configured].")
    ] = None,
    lora_dir: Annotated[
        Path | None, typer.Option("--lora-dir", help="Folder of LoRA adapters requests may name.")
    ] = None,
    lora_slots: Annotated[int | None, typer.Option(help="LoRA adapters kept loaded per pipeline [4].")] = None,
    lora_max_rank: Annotated[
        int | None, typer.Option(help="With --compile: LoRA hot-swap slots of this rank [0: no adapters].")
    ] = None,
    max_batch: Annotated[int | None, typer.Option(help="Largest batch of compatible jobs per pipeline call.")] = None,
    batch_max_pixels: Annotated[
        int | None, typer.Option(help="Batch images up to this many pixels [512*512 on CUDA, else 320*320].")
    ] = None,
    database: Annotated[str | None, typer.Option(help="SQLAlchemy URL [default: SQLite in the data dir].")] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda, cuda:1, mps; cuda:0,cuda:1 or all: a worker each.")
    ] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile", help="torch.compile the transformer blocks (warm-up at start).")
    ] = None,
    quantize: Annotated[str | None, typer.Option(help="none or fp8 (torchao; lossy; compute capability 8.9+).")] = None,
    attention: Annotated[str | None, typer.Option(help="auto, native, flash, _flash_3, sage, ...")] = None,
    cache: Annotated[str | None, typer.Option(help="first-block[=THRESHOLD]: First-Block-Cache (lossy).")] = None,
    offload: Annotated[str | None, typer.Option(help="auto, none, model, group.")] = None,
    vae_tiling: Annotated[bool | None, typer.Option("--vae-tiling", help="Decode large images in tiles.")] = None,
    api_only: Annotated[
        bool | None, typer.Option("--api-only", help="PostgreSQL: no workers here (`fluxserve worker` runs them).")
    ] = None,
    storage: Annotated[str | None, typer.Option(help="file:///path [data dir] or s3://bucket/prefix.")] = None,
) -> None:
    """Start the HTTP server (with its own workers, unless --api-only)."""
    import uvicorn

    from .app import create_app
    from .auth import create_key
    from .http_protocol import header_deadline_protocol
    from .logs import configure as configure_logging

    settings = _settings(
        demo=demo,
        host=host,
        port=port,
        data_dir=data_dir,
        public_url=public_url,
        model_config_file=model_config,
        upstream_config_file=upstream_config,
        allow_private_urls=allow_private_urls,
        cors_origins=cors_origins,
        models=models,
        lora_dir=lora_dir,
        lora_slots=lora_slots,
        lora_max_rank=lora_max_rank,
        max_batch=max_batch,
        batch_max_pixels=batch_max_pixels,
        database_url=database,
        device=device,
        compile=compile,
        quantize=quantize,
        attention=attention,
        cache=cache,
        offload=offload,
        vae_tiling=vae_tiling,
        api_only=api_only,
        storage=storage,
    )
    if settings.api_only and not settings.on_postgres:
        typer.echo("fluxserve: --api-only needs a shared PostgreSQL database (--database postgresql://...)", err=True)
        raise typer.Exit(2)
    if not settings.api_only:
        _check_engine_installed()
    elif not (settings.storage or "").startswith("s3://"):
        typer.echo(
            f"Storage is the folder {settings.storage or settings.outputs_dir}: every API node and worker "
            "must see this same folder (or use --storage s3://bucket/prefix)."
        )
    if settings.quantize == "fp8":
        _check_fp8(settings)
    configure_logging(settings.log_format)
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # keys, secrets, images: owner-only
    store = _open_store(settings.database)
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
def worker(
    database: Annotated[
        str | None, typer.Option(help="The shared PostgreSQL database, postgresql://... [env FLUXSERVE_DATABASE_URL].")
    ] = None,
    storage: Annotated[str | None, typer.Option(help="file:///path or s3://bucket/prefix, as the API nodes.")] = None,
    device: Annotated[str | None, typer.Option(help="cuda:0, cpu, ...; cuda:0,cuda:1 or all: a worker each.")] = None,
    models: Annotated[str | None, typer.Option(help="Model names to serve, comma-separated (default: all).")] = None,
    demo: Annotated[bool | None, typer.Option("--demo", help="Serve every model name with the demo model.")] = None,
    data_dir: DataDir = None,
    model_config: Annotated[Path | None, typer.Option("--model-config", help="TOML file of model names.")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Largest batch of compatible jobs per pipeline call.")] = None,
    compile: Annotated[bool | None, typer.Option("--compile", help="torch.compile (warm-up before fetching).")] = None,
    quantize: Annotated[str | None, typer.Option(help="none or fp8.")] = None,
    offload: Annotated[str | None, typer.Option(help="auto, none, model, group.")] = None,
    lora_dir: Annotated[Path | None, typer.Option("--lora-dir", help="Folder of LoRA adapters.")] = None,
    upstream_config: UpstreamConfigOpt = None,
    upstreams_only: Annotated[
        bool, typer.Option("--upstreams-only", help="Only upstream-provider workers: no GPU, no torch.")
    ] = False,
) -> None:
    """A GPU worker: loads its models, then runs the jobs queued for them, from any API node.
    With --upstreams-only: the jobs routed to upstream providers, many at once, and no device.

    SIGTERM: the running job may finish (FLUXSERVE_SHUTDOWN_GRACE_S), queued ones stay; a second
    SIGTERM gives the running job back to the queue now."""
    import asyncio

    from .app import build_core
    from .logs import configure as configure_logging
    from .queue.runner import WORKER_POOL, install_stop_signals

    settings = _settings(
        database_url=database,
        storage=storage,
        device=device,
        models=models,
        demo=demo,
        data_dir=data_dir,
        model_config_file=model_config,
        upstream_config_file=upstream_config,
        max_batch=max_batch,
        compile=compile,
        quantize=quantize,
        offload=offload,
        lora_dir=lora_dir,
    )
    if not settings.on_postgres:
        typer.echo("fluxserve: worker needs the shared PostgreSQL database (--database postgresql://...)", err=True)
        raise typer.Exit(2)
    if not upstreams_only:
        _check_engine_installed()
    if settings.quantize == "fp8" and not upstreams_only:
        _check_fp8(settings)
    configure_logging(settings.log_format)
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # demo model, compile cache, LoRA cache
    # Upstream slots each write their job's events and leases: a pool that grows with them.
    pool = {"pool_size": 8, "pool_overflow": 8} if upstreams_only else {"pool_size": WORKER_POOL, "pool_overflow": 0}
    core = build_core(settings, _open_store(settings.database, role="worker", **pool))
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


MaxQueued = Annotated[
    int | None, typer.Option("--max-queued", min=0, help="Jobs queued or running at once (0: no limit).")
]
Rpm = Annotated[int | None, typer.Option("--rpm", min=0, help="Creates per minute (0: no limit).")]
ImagesPerDay = Annotated[int | None, typer.Option("--images-per-day", min=0, help="Images per UTC day (0: no limit).")]


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="A label for the key.")],
    max_queued: MaxQueued = None,
    rpm: Rpm = None,
    images_per_day: ImagesPerDay = None,
    data_dir: DataDir = None,
    database: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Create a key and print it alone on stdout (it is stored hashed: save it now).
    Limits not given follow the server's defaults (FLUXSERVE_*_PER_KEY)."""
    from .auth import create_key
    from .limits import Limits

    store = _store(data_dir, database)
    new = create_key(store, name)
    store.set_key_limits(new.id, Limits(max_queued, rpm, images_per_day))
    store.close()
    typer.echo(new.key)


@keys_app.command("update")
def keys_update(
    key: Annotated[str, typer.Argument(help="Key id or name.")],
    max_queued: MaxQueued = None,
    rpm: Rpm = None,
    images_per_day: ImagesPerDay = None,
    credits: Annotated[
        float | None, typer.Option("--credits", min=0, help="Set the key's balance (priced models charge it).")
    ] = None,
    unmetered: Annotated[bool, typer.Option("--unmetered", help="Remove the key's balance: no credit check.")] = False,
    data_dir: DataDir = None,
    database: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Change a key's limits or credits; they hold at once on every node sharing the database."""
    from .limits import Limits

    limits = Limits(max_queued, rpm, images_per_day)
    if not any(v is not None for v in vars(limits).values()) and credits is None and not unmetered:
        typer.echo("Nothing to change: give --max-queued, --rpm, --images-per-day, --credits or --unmetered.", err=True)
        raise typer.Exit(2)
    store = _store(data_dir, database)
    n = store.set_key_limits(key, limits)
    if credits is not None or unmetered:
        n = max(n, store.set_key_credits(key, None if unmetered else credits))
    store.close()
    if n == 0:
        typer.echo(f"No active key with id or name {key!r}.", err=True)
        raise typer.Exit(1)
    typer.echo(f"Updated {n} key(s).", err=True)


@app.command("usage")
def usage_report(
    key: Annotated[str | None, typer.Option("--key", help="Only this key (id or name).")] = None,
    since: Annotated[str | None, typer.Option(help="From this UTC day, YYYY-MM-DD [default: today].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    data_dir: DataDir = None,
    database: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Usage per key, model and UTC day: jobs, images, megapixels, worker seconds."""
    import json

    from .errors import InvalidInput
    from .usage import parse_since, usage

    try:
        start = parse_since(since, param="--since")
    except InvalidInput as exc:
        typer.echo(f"fluxserve: {exc.message}", err=True)
        raise typer.Exit(2) from None
    store = _store(data_dir, database)
    owner = None
    if key is not None:
        match = [row.id for row in store.list_keys() if key in (row.id, row.name)]
        if not match:
            typer.echo(f"No key with id or name {key!r}.", err=True)
            raise typer.Exit(1)
        owner = match[0]
    rows = usage(store, start, owner)
    store.close()
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row.to_dict()))
        return
    head = f"{'day':<10}  {'key':<20}  {'model':<20}  {'jobs':>6}  {'images':>7}  {'MP':>9}  {'worker s':>9}"
    typer.echo(f"{head}  {'cost':>9}")
    for r in rows:
        typer.echo(
            f"{r.day:<10}  {r.key[:20]:<20}  {r.model[:20]:<20}  {r.jobs:>6}  {r.images:>7}  "
            f"{r.megapixels:>9.2f}  {r.worker_seconds:>9.1f}  {r.cost:>9.4g}"
        )


@keys_app.command("list")
def keys_list(data_dir: DataDir = None, database: Annotated[str | None, typer.Option()] = None) -> None:
    """List keys (id, name, prefix, state, limits; '-' follows the server default, 0 is no limit)."""
    store = _store(data_dir, database)
    for row in store.list_keys():
        state = "revoked" if row.revoked_at else "active"
        names = ("max_queued", "rpm", "images_per_day")
        limits = " ".join(f"{n}={'-' if getattr(row, n) is None else getattr(row, n)}" for n in names)
        credits = "-" if row.credits is None else f"{row.credits:g}"
        typer.echo(f"{row.id}\t{row.name}\t{row.prefix}...\t{state}\t{limits} credits={credits}")
    store.close()


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="Key id or name.")],
    data_dir: DataDir = None,
    database: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Revoke a key by id or name."""
    store = _store(data_dir, database)
    n = store.revoke_key(key)
    store.close()
    if n == 0:
        typer.echo(f"No active key with id or name {key!r}.", err=True)
        raise typer.Exit(1)
    typer.echo(f"Revoked {n} key(s).", err=True)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    model: Annotated[str, typer.Option(help="Model name.")] = "flux",
    size: Annotated[str, typer.Option(help="WxH, multiples of 16.")] = "1024x1024",
    n: Annotated[int, typer.Option("-n", "--n", min=1, max=10, help="Number of images.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Seed of the first image (image i uses seed + i).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps [model default].")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance [model default].")] = None,
    output_format: Annotated[str, typer.Option("--format", help="png, jpeg or webp.")] = "png",
    out: Annotated[Path, typer.Option(help="Folder for the images.")] = Path("."),
    demo: Annotated[bool | None, typer.Option("--demo", help="Use the demo model.")] = None,
    model_config: Annotated[Path | None, typer.Option("--model-config", help="TOML: model names -> weights.")] = None,
    data_dir: DataDir = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1, mps.")] = None,
) -> None:
    """Generate images in this process, without a server, and print the files written."""
    from .app import build_engine, build_registry
    from .engine.base import EngineRequest
    from .errors import FluxServeError
    from .outputs import EXTENSIONS, encode_image
    from .spec import parse_size

    settings = _settings(demo=demo, model_config_file=model_config, data_dir=data_dir, device=device)
    registry = build_registry(settings)
    try:
        if output_format not in EXTENSIONS:
            raise typer.BadParameter(f"--format must be one of {', '.join(EXTENSIONS)}", param_hint="--format")
        width, height = parse_size(size, param="--size")
        spec = registry.get(model, param="--model").make_spec(
            prompt=prompt,
            width=width,
            height=height,
            num_images=n,
            steps=steps,
            guidance=guidance,
            seed=seed,
            output_format=output_format,  # type: ignore[arg-type]
            params={"size": "--size", "steps": "--steps", "guidance": "--guidance", "seed": "--seed"},
        )
    except FluxServeError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    engine = build_engine(settings, registry)
    engine.load()
    [images] = engine.generate(
        [EngineRequest(spec)], lambda done, total, _p: typer.echo(f"step {done}/{total}", err=True)
    )
    out.mkdir(parents=True, exist_ok=True)
    label = registry.get(model).label
    for image, image_seed in zip(images, spec.image_seeds(), strict=True):
        path = out / f"{model}-{image_seed}.{EXTENSIONS[output_format]}"
        meta = {"prompt": prompt, "seed": image_seed, "model": label, "steps": spec.steps}
        path.write_bytes(encode_image(image, output_format, 95, meta, png_compress_level=settings.png_compress_level))
        typer.echo(str(path))


@app.command("demo-model")
def demo_model(path: Annotated[Path, typer.Argument(help="Folder to write the demo model to.")]) -> None:
    """Build the demo model (random weights, real FLUX geometry) offline."""
    from .engine.demo import build_demo_model

    build_demo_model(path)
    typer.echo(str(path))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
