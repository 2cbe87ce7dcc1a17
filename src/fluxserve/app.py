"""create_app(settings): wires store, storage, registry, engine, dispatcher and the dialects."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from . import __version__
from .api import device as device_routes
from .api import files, upstream_hooks, usage
from .api import loras as lora_routes
from .api.bodylimit import BodyLimit
from .api.deps import Services
from .api.dialects import (
    DIALECTS,
    body_limit_for,
    prefixes,
    render_error,
    render_for_webhook,
    webhook_headers_for,
    webhook_rules,
    webhook_secret_for,
)
from .api.errors import install_error_handlers
from .api.jobheaders import JobHeaders
from .api.lean import LeanReads, plans
from .api.prefixes import ProviderPrefixes
from .api.ratelimit import RateLimitHeaders
from .auth import Authenticator
from .engine.base import Engine
from .engine.safety import SafetyChecker
from .errors import StoreUnavailable
from .files import FileService
from .job import EventKind
from .jobs import JobService
from .licensing import LicenceReporter
from .limits import Limits
from .logs import RequestLog
from .loras import LoraLibrary
from .metrics import Metrics
from .migrations import open_store
from .models import ModelRegistry
from .models.licensing import BflLicensing, parse_licensing
from .provenance import Provenance
from .queue import build as build_queue
from .queue import hooks as queue_hooks
from .queue.base import Queue
from .queue.listen import listen
from .retention import RetentionSweeper
from .settings import Settings, parse_cache
from .sizes import parse_bytes
from .storage import Storage, build_storage, load_or_create_secret
from .store import KEYS_CHANGED, Store
from .webhooks import WebhookSender
from .workers import DeviceWorker

log = logging.getLogger(__name__)


def build_registry(settings: Settings) -> ModelRegistry:
    """The model tables, then the upstream config's on top (its [models.*] route names to its upstreams).
    With --demo the files set only aliases, routes and prices: the demo model answers the local names."""
    demo = settings.demo
    registry = ModelRegistry.demo(settings.demo_model_dir) if demo else ModelRegistry.default()
    for path in (settings.model_config_file, settings.upstream_config_file):
        if path is not None:
            registry = registry.layered(path, demo_weights=demo)
    if not demo:
        registry = registry.label_demo_weights()
    return registry.only(settings.models) if settings.models else registry


def devices(settings: Settings) -> list[str]:
    """--device cuda:0,cuda:1 (or all) runs one worker per device; anything else is one worker."""
    if settings.device == "all":
        import torch

        count = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(count)] if count else ["auto"]
    return [d.strip() for d in settings.device.split(",") if d.strip()] or ["auto"]


def preloaded(settings: Settings, registry: ModelRegistry) -> list[str] | None:
    """The names loaded at start (None: every one); an unknown name is a start-up error."""
    if "all" in settings.preload or (settings.compile and not settings.preload):
        return None
    unknown = [name for name in settings.preload if name not in registry]
    if unknown:
        raise ValueError(f"--preload names unknown models {unknown}; served: {', '.join(registry.names)}")
    return [registry.get(name).name for name in settings.preload]


def build_engine(settings: Settings, registry: ModelRegistry, device: str | None = None) -> Engine:
    from .engine.flux import DiffusersEngine
    from .engine.speed import SpeedOptions
    from .spec import parse_size

    speed = SpeedOptions(
        compile=settings.compile,
        quantize=settings.quantize,
        attention=settings.attention,
        first_block_cache=parse_cache(settings.cache),
        offload=settings.offload,
        vae_tiling=settings.vae_tiling,
        compile_cache_dir=settings.data_dir / "compile-cache",
        warmup_sizes=tuple(parse_size(s, param="warmup_sizes") for s in settings.warmup_sizes),
        lora_hotswap_rank=settings.lora_max_rank,
    )
    engine = DiffusersEngine(
        registry,
        device=device or settings.device,
        local_files_only=settings.offline or settings.demo,
        speed=speed,
        lora_slots=settings.lora_slots,
        step_delay_s=settings.demo_step_delay_s if settings.demo else 0.0,
        preload=preloaded(settings, registry),
        memory_budget=None if settings.memory_budget is None else parse_bytes(settings.memory_budget),
        cpu_memory_budget=None if settings.cpu_memory_budget is None else parse_bytes(settings.cpu_memory_budget),
    )
    if settings.demo:
        from .engine.demo import build_demo_model

        demo_dir = settings.demo_model_dir
        engine.before_load = lambda: build_demo_model(demo_dir)
    return engine


def build_device_workers(
    settings: Settings,
    jobs: JobService,
    storage: Storage,
    registry: ModelRegistry,
    loras: LoraLibrary,
    engines: list[Engine] | None = None,
    **kw: Any,
) -> list[DeviceWorker]:
    """One DeviceWorker per device (`serve` and `worker` alike); ``engines`` replace the devices' (tests).
    None when every name is served upstream: nothing to load, no torch."""
    registry = registry.local()
    if not registry.names and not engines:
        return []
    chosen = engines or [build_engine(settings, registry, d) for d in devices(settings)]
    return [
        DeviceWorker(
            jobs,
            storage,
            e,
            registry,
            max_batch=settings.max_batch,
            batch_max_pixels=settings.batch_max_pixels,
            png_compress_level=settings.png_compress_level,
            nice=settings.worker_nice,
            loras=loras,
            storage_retry_s=settings.storage_retry_s,
            idle_unload_s=settings.idle_unload_s,
            max_model_wait_s=settings.max_model_wait_s,
            **kw,
        )
        for e in chosen
    ]


def build_lora_library(settings: Settings) -> LoraLibrary:
    return LoraLibrary(
        settings.lora_dir,
        settings.lora_cache_dir,
        cache_bytes=int(settings.lora_cache_gb * 1024**3),
        max_bytes=settings.lora_max_mb * 1024**2,
        offline=settings.offline or settings.demo,
        allow_private=settings.allow_private_urls,
        # Compiled pipelines take adapters only through hot-swap slots of this rank.
        max_rank=settings.lora_max_rank if settings.compile else None,
    )


@dataclass(frozen=True)
class Core:
    """What every process of a deployment builds alike (`serve`, `serve --api-only`, `worker`)."""

    store: Store
    registry: ModelRegistry
    secret: bytes
    storage: Storage
    jobs: JobService
    queue: Queue
    loras: LoraLibrary
    provenance: Provenance
    safety: SafetyChecker | None  # the output safety check, where the operator configured one
    licensing: BflLicensing | None  # BFL self-hosted licence usage reporting ([licensing.bfl])

    def device_workers(self, settings: Settings, engines: list[Engine] | None = None, **kw: Any) -> list[DeviceWorker]:
        kw.setdefault("provenance", self.provenance)
        kw.setdefault("safety", self.safety)
        return build_device_workers(settings, self.jobs, self.storage, self.registry, self.loras, engines, **kw)

    def upstream_workers(self, settings: Settings) -> list[Any]:
        """One UpstreamWorker per [upstreams.NAME] that some name routes to (serve, worker --upstreams-only)."""
        from .upstream.worker import UpstreamWorker

        return [
            UpstreamWorker(
                self.jobs,
                self.storage,
                self.registry,
                config,
                allow_private=settings.allow_private_urls,
                storage_retry_s=settings.storage_retry_s,
                # A provider's webhook needs a URL it can reach: only an operator's --public-url is one.
                hooks=(settings.public_url, self.secret) if settings.public_url else None,
                provenance=self.provenance,
                safety=self.safety,
            )
            for name, config in self.registry.upstreams.items()
            if self.registry.routed_to(name)
        ]

    def close(self) -> None:
        self.jobs.close()
        self.store.close()


def store_options(settings: Settings) -> dict[str, Any]:
    """What every process's store is built with: its queue's hooks and the dialects' webhook rules."""
    return {"queue": queue_hooks(settings.database), "webhook_rules": webhook_rules()}


def build_core(settings: Settings, store: Store) -> Core:
    """The one wiring: registry, secret, storage, the job service and its queue (chosen here, once) over
    a store opened with ``store_options``."""
    registry = build_registry(settings)
    secret = server_secret(settings, store)
    storage = build_storage(
        settings.storage,
        settings.outputs_dir,
        secret,
        settings.base_url,
        settings.url_ttl_s,
        settings.s3_endpoint_url,
        settings.s3_public_url,
    )
    defaults = Limits(settings.max_queued_per_key, settings.rpm_per_key, settings.images_per_day_per_key)
    licensing = parse_licensing(settings.model_config_file, set(registry.names))
    jobs = JobService(
        store,
        max_attempts=settings.max_attempts,
        lease_s=settings.lease_s,
        limits=defaults,
        registry=registry,
        licensed=licensing.slugs if licensing else None,
    )
    queue = build_queue(settings, jobs)
    return Core(
        store,
        registry,
        secret,
        storage,
        jobs,
        queue,
        build_lora_library(settings),
        build_provenance(settings, secret),
        build_safety(settings),
        licensing,
    )


def build_safety(settings: Settings) -> SafetyChecker | None:
    """--safety-model: the classifier (loaded on a worker's first image); none: nothing is filtered."""
    if settings.safety_model is None:
        return None
    return SafetyChecker(
        settings.safety_model,
        threshold=settings.safety_threshold,
        labels=settings.safety_labels,
        max_tolerance=settings.safety_max_tolerance,
    )


def build_provenance(settings: Settings, secret: bytes) -> Provenance:
    """--provenance on (the default): the operator's certificate or the secret's self-signed one."""
    if settings.provenance == "off":
        log.warning("provenance is off: images are not marked as AI-generated (see docs/provenance.md)")
        return Provenance.off()
    return Provenance.configure(
        secret, cert=settings.c2pa_cert, key=settings.c2pa_key, prompt=settings.provenance_prompt
    )


def server_secret(settings: Settings, store: Store) -> bytes:
    """FLUXSERVE_SECRET (hex, or any string, hashed), else on a shared database the one kept there (every
    node signs alike), else the data dir's secret.key."""
    if settings.secret:
        try:
            return bytes.fromhex(settings.secret)
        except ValueError:
            return hashlib.sha256(settings.secret.encode()).digest()
    if not store.is_sqlite:
        return store.shared_secret()
    return load_or_create_secret(settings.data_dir / "secret.key")


def _count(app: FastAPI, route: str, method: str, status: int) -> None:
    metrics: Metrics | None = getattr(app.state, "metrics", None)  # None before the lifespan started
    if metrics is not None:
        metrics.count_request(route, method, status)


def create_app(settings: Settings, *, engine: Engine | None = None, engines: list[Engine] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        core = build_core(settings, open_store(settings.database, **store_options(settings)))
        store, registry, storage, jobs, queue = core.store, core.registry, core.storage, core.jobs, core.queue
        # The queue's workers run on a thread (SQLite) or as this node's queue workers (PostgreSQL; their
        # images are stored before the task returns, so no overlapped encoding); an API node runs none.
        device_workers: list[Any] | None = None
        if not settings.api_only:
            overlap = {} if queue.name == "local" else {"overlap_encoding": False}
            device_workers = core.device_workers(settings, engines or ([engine] if engine else None), **overlap)
            device_workers += core.upstream_workers(settings)
        workers = queue.dispatcher(device_workers)
        background = [asyncio.create_task(loop) for loop in queue.background()]
        services = Services(
            settings,
            store,
            storage,
            registry,
            jobs,
            workers,
            Authenticator(store, settings.api_key),
            core.secret,
            core.loras,
            FileService(
                store,
                storage,
                jobs.offload,
                max_files=settings.files_per_key,
                max_bytes=parse_bytes(settings.file_bytes_per_key),
            ),
            core.provenance,
        )
        app.state.services = services
        upstreams = [w for w in device_workers or [] if w.route]
        app.state.metrics = metrics = Metrics(
            store,
            lambda: workers.state,
            settings.metrics_token,  # its own token: the API key would let every scraper create jobs
            lambda: upstreams,
            lambda: [w.engine_info() for w in workers.local_workers() if not w.route],
            lambda: dict(core.provenance.counts),
            lambda: dict(core.safety.counts) if core.safety else {},
        )
        for worker in workers.local_workers():
            worker.observe(metrics.model_loaded, metrics.model_evicted)
        webhooks = WebhookSender(
            store,
            render=lambda job: render_for_webhook(services, job),
            secret_for=lambda job: webhook_secret_for(services, job),
            extra_headers=webhook_headers_for,
            allow_private=settings.allow_private_urls,
            retry_base_s=settings.webhook_retry_base_s,
        )
        wakes = (EventKind.SUBMITTED, EventKind.REQUEUED, EventKind.ROUTED)
        jobs.on_change(lambda job, kind: workers.wake(job) if kind in wakes else None)
        jobs.on_change(webhooks.wake)
        if queue.name == "postgres":  # changes committed by other nodes wake this node's waiters and sender

            def on_notify(job_id: str, event: str, hooked: bool) -> None:
                if job_id == KEYS_CHANGED:  # a key was revoked or changed on some node
                    services.auth.forget()
                    return
                jobs.wake(job_id)
                if hooked:  # jobs without a webhook wrote nothing to send; the sender sleeps while idle
                    webhooks.wake()

            background.append(asyncio.create_task(listen(settings.database, on_notify)))
        sweeper = RetentionSweeper(store, storage, settings.retention_s, settings.retention_sweep_s)
        reporter = LicenceReporter(store, core.licensing) if core.licensing else None
        if reporter is not None:
            reporter.start()
        webhooks.start()
        workers.start()
        sweeper.start()
        try:
            async with AsyncExitStack() as running:
                for dialect in DIALECTS:
                    if dialect.lifespan is not None:
                        await running.enter_async_context(dialect.lifespan(app, services))
                yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            sweeper.stop()
            workers.stop()
            webhooks.stop()
            if reporter is not None:
                reporter.stop()
            core.close()

    app = FastAPI(title="fluxserve", version=__version__, lifespan=lifespan)
    routers = [
        *(router for dialect in DIALECTS for router in dialect.routers),
        files.router,
        usage.router,
        device_routes.router,
        lora_routes.router,
        upstream_hooks.router,
    ]
    # Added first, so innermost: what it answers passes every middleware added after it (logs, job headers, CORS).
    routes = [*app.routes, *(route for router in routers for route in router.routes)]  # the router's order
    # A route marked @lean that the lean path cannot answer fails here, not on its first request.
    app.add_middleware(LeanReads, plans=plans(routes))
    # Inside CORS: browsers read its 413s.
    app.add_middleware(BodyLimit, limit_for=body_limit_for, render=render_error, idle_s=settings.body_idle_timeout_s)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["*"],
    )
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(JobHeaders)
    app.add_middleware(RequestLog, on_done=lambda *request: _count(app, *request))
    app.add_middleware(ProviderPrefixes, prefixes=prefixes())  # outermost: everything after sees the dialect's path
    install_error_handlers(app, render_error)
    for router in routers:
        app.include_router(router)
    web_dir = Path(__file__).parent / "web"
    app.mount("/web", StaticFiles(directory=web_dir), name="web")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(web_dir / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        registry: Metrics = app.state.metrics
        registry.check_access(request.client.host if request.client else None, request.headers.get("authorization"))
        body, content_type = await app.state.services.jobs.run(registry.render)  # reads the store: off the loop
        return Response(body, media_type=content_type)

    @app.get("/health")
    async def health() -> JSONResponse:
        services: Services = app.state.services
        d = services.dispatcher
        status: str = d.state
        reasons = [d.degraded] if d.degraded else []
        queue_depth: int | None = None
        try:
            # Bounded: health answers within a second even while the database is stuck.
            queue_depth = await asyncio.wait_for(services.jobs.queue_depth(), 0.8)
        except (StoreUnavailable, TimeoutError) as exc:
            reasons.append(exc.message if isinstance(exc, StoreUnavailable) else "the database is not answering")
        if reasons and status == "ready":
            status = "degraded"
        body: dict[str, Any] = {
            "status": status,
            "models": d.loaded_models(),
            "demo": settings.demo,
            "queue_depth": queue_depth,
            "version": __version__,
            "sleeping": any(w.sleeping for w in d.local_workers()),  # POST /sleep: jobs wait for /wake_up
        }
        if reasons:
            body["reason"] = "; ".join(reasons)
        if d.load_error:
            body["error"] = d.load_error
        body["engine"] = d.engine_info()
        return JSONResponse(body, status_code=503 if d.state == "error" else 200)

    return app
