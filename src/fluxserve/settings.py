"""Settings: CLI flags > FLUXSERVE_* environment > optional TOML file > defaults."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .durations import parse_retention
from .sizes import parse_bytes

ENV_PREFIX = "FLUXSERVE_"
DEFAULT_FBCACHE_THRESHOLD = 0.08


def parse_cache(value: str | None) -> float | None:
    """'first-block' or 'first-block=0.12' -> threshold; None or 'none' -> off."""
    if value is None or value in ("", "none", "off"):
        return None
    name, _, threshold = value.partition("=")
    if name != "first-block":
        raise ValueError(f"--cache must be 'first-block' or 'first-block=THRESHOLD'; got {value!r}")
    t = float(threshold) if threshold else DEFAULT_FBCACHE_THRESHOLD
    if not 0 < t < 1:
        raise ValueError(f"first-block cache threshold must be between 0 and 1; got {t}")
    return t


def attention_backends() -> list[str]:
    """``auto`` plus the names diffusers' attention dispatcher knows (empty without diffusers)."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName
    except ImportError:
        return []
    return ["auto", *(b.value for b in AttentionBackendName)]


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "fluxserve"


class Settings(BaseSettings):
    # enable_decoding=False: list settings come from the environment as written in the docs, comma-separated
    # (FLUXSERVE_MODELS=flux-dev,flux-schnell), not only as JSON; _split_lists reads both.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True, enable_decoding=False
    )

    data_dir: Path = Field(default_factory=_default_data_dir, description="SQLite file, outputs, demo model cache.")
    host: str = Field(default="127.0.0.1", description="Listen address.")
    port: int = Field(default=8000, ge=0, le=65535, description="Listen port.")
    public_url: str | None = Field(default=None, description="Base of absolute URLs handed to clients.")
    api_key: str | None = Field(
        default=None, description="A key valid in addition to the stored ones (its owner is the operator)."
    )
    demo: bool = Field(default=False, description="Serve every model name with the demo model.")
    # Tests that need a job to take a while (a kill -9 mid-job, a cancel) wait on this, not on big images.
    demo_step_delay_s: float = Field(
        default=0.0, ge=0, le=10, description="Demo model only: pause this many seconds after each step."
    )
    model_config_file: Path | None = Field(
        default=None,
        validation_alias="FLUXSERVE_MODEL_CONFIG",
        description="TOML file mapping model names to weights.",
        json_schema_extra={"flag": "--model-config"},
    )
    # [upstreams.NAME] tables and the [models.NAME] tables that route to them (fluxserve.upstream).
    upstream_config_file: Path | None = Field(
        default=None,
        validation_alias="FLUXSERVE_UPSTREAM_CONFIG",
        description="TOML: [upstreams.NAME] providers and the [models.NAME] routed to them.",
        json_schema_extra={"flag": "--upstream-config"},
    )
    allow_private_urls: bool = Field(
        default=False, description="Let image-URL inputs and webhooks reach loopback and private hosts."
    )
    cors_origins: list[str] = Field(default=["*"], description="Allowed browser origins, comma-separated.")
    # The model names to serve (and load); empty: every name the registry has.
    models: list[str] = Field(default=[], description="Model names to serve, comma-separated (empty: all).")
    preload: list[str] = Field(
        default=[],
        description="Names to load at start, comma-separated, or all; the others load when their first job runs "
        "(unset with --compile: all, so the warm-up runs at start).",
    )
    # The device's memory ledger (engine.memory): bytes, or with a unit; None: measured at start.
    memory_budget: str | None = Field(
        default=None,
        description="Device memory the loaded pipelines may take, e.g. 20GiB (unset: the GPU's free memory at "
        "start less 6 GiB for activations; on CPU half the RAM). Least recently used pipelines make room.",
    )
    cpu_memory_budget: str | None = Field(
        default=None,
        description="Host memory that keeps pipelines moved off the device, so warming them again is a copy, "
        "not a disk read (unset: a quarter of the RAM; 0: none kept).",
    )
    idle_unload_s: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a loaded pipeline may sit unused before it leaves the device (0: never); never "
        "a preloaded name, nor one a queued job waits for.",
        json_schema_extra={"flag": "--idle-unload"},
    )
    max_model_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="A worker prefers jobs for the models it has loaded, but no job waits longer than this "
        "many seconds because of that preference.",
        json_schema_extra={"flag": "--max-model-wait"},
    )
    # LoRA adapters: a folder requests name files in; fetched ones cached by content hash (LRU).
    lora_dir: Path | None = Field(default=None, description="Folder of LoRA adapters requests may name.")
    lora_cache_gb: float = Field(
        default=10.0, gt=0, description="Size of the cache of fetched LoRA adapters (LRU, by content hash), in GB."
    )
    lora_max_mb: int = Field(
        default=2048, ge=1, description="The largest LoRA adapter fetched, in MB."
    )  # one fetched adapter
    lora_slots: int = Field(default=4, ge=1, le=64, description="LoRA adapters kept loaded per pipeline.")
    # Under --compile, adapters go into hot-swap slots of this rank (0: no adapters with --compile).
    lora_max_rank: int = Field(
        default=0, ge=0, le=1024, description="With --compile: LoRA hot-swap slots of this rank (0: no adapters)."
    )
    # Images, inputs and previews are deleted this long after their job ('7d', '36h'; 0 keeps them).
    retention: str = Field(
        default="7d",
        description="Images, inputs and previews are deleted this long after their job ('7d', '36h'; 0 keeps them).",
    )
    retention_sweep_s: float = Field(default=60.0, gt=0, description="How often the retention sweep runs, in seconds.")
    log_format: Literal["text", "json"] = Field(default="text", description="text or json.")
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="Request headers not complete within this many seconds: 408."
    )  # request headers not complete by then: 408
    body_idle_timeout_s: float = Field(
        default=30.0, gt=0, description="A request body that stalls this many seconds: 408."
    )  # a request body that stalls this long: 408
    # /metrics answers loopback, and elsewhere this bearer token only (never the API key: a scraper's
    # credential would create jobs).
    metrics_token: str | None = Field(
        default=None, description="Bearer token for /metrics from other than loopback (unset: loopback only)."
    )
    # Per-key limits (fluxserve.limits), defaults for keys without their own; 0 means no limit.
    max_queued_per_key: int = Field(
        default=1000, ge=0, description="Queued jobs per key, for keys without their own limit (0: no limit)."
    )
    rpm_per_key: int = Field(
        default=0, ge=0, description="Creates per minute per key, for keys without their own limit (0: no limit)."
    )
    images_per_day_per_key: int = Field(
        default=0, ge=0, description="Images per UTC day per key, for keys without their own limit (0: no limit)."
    )
    files_per_key: int = Field(
        default=500, ge=0, description="Files a key may keep uploaded (/v1/files) at once (0: no limit)."
    )
    file_bytes_per_key: str = Field(
        default="2GiB", description="Bytes of uploaded files a key may keep at once, e.g. 500MiB (0: no limit)."
    )
    max_batch: int = Field(default=8, ge=1, le=64, description="Largest batch of compatible jobs per pipeline call.")
    # None: by device (worker.default_batch_max_pixels); a number overrides it everywhere.
    batch_max_pixels: int | None = Field(
        default=None, ge=0, description="Batch images up to this many pixels (unset: 512*512 on CUDA, else 320*320)."
    )
    # zlib level for PNG outputs (lossless at any level). Measured on a 1024x1024 photo-like image
    # (2-core CPU): level 6 (Pillow's default) 349 ms and 1.71 MB, level 1 166 ms and 1.96 MB.
    png_compress_level: int = Field(
        default=1, ge=0, le=9, description="zlib level of PNG outputs (lossless at any level; 1 is twice as fast as 6)."
    )
    # EU AI Act Art. 50(2): outputs marked as AI-generated, machine-readably (docs/provenance.md).
    provenance: Literal["on", "off"] = Field(
        default="on",
        description="on: every image gets a watermark, XMP DigitalSourceType and a signed C2PA manifest; off: none.",
    )
    c2pa_cert: str | None = Field(
        default=None,
        description="PEM certificate chain (a path or the text) signing C2PA manifests (unset: made from the secret).",
    )
    c2pa_key: str | None = Field(default=None, description="PEM private key of --c2pa-cert (a path or the text).")
    provenance_prompt: bool = Field(
        default=False, description="Write each image's prompt into its C2PA manifest (off: privacy)."
    )
    safety_model: Path | None = Field(
        default=None,
        description="Folder of an image classifier (transformers) run on each output (unset: no filtering).",
    )
    safety_threshold: float = Field(
        default=0.5, gt=0, lt=1, description="Score of an unsafe label at which an image is withheld (tolerance 2)."
    )
    safety_labels: list[str] = Field(
        default=["nsfw"], description="The safety model's labels that count as unsafe, comma-separated."
    )
    safety_max_tolerance: int = Field(
        default=2,
        ge=0,
        le=6,
        description="Most permissive safety_tolerance a request may ask for (6: clients may turn the check off).",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL (unset: SQLite in the data dir); postgresql://... past one machine.",
        json_schema_extra={"flag": "--database"},
    )
    # Past one machine (PostgreSQL): serve without workers (API nodes); where images live; the secret
    # every node signs URLs and derives webhook secrets with (else one kept in the database).
    api_only: bool = Field(default=False, description="PostgreSQL: no workers here (`fluxserve worker` runs them).")
    storage: str | None = Field(
        default=None, description="file:///path (unset: DATA_DIR/outputs) or s3://bucket/prefix, as every node."
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="An S3-compatible server's URL; the AWS_* variables give keys and region."
    )  # S3-compatible servers; the AWS_* variables give keys and region
    # Where clients reach that server when it differs from where the nodes do (containers: http://s3:9000
    # inside, http://localhost:9000 outside): presigned URLs are signed for this address.
    s3_public_url: str | None = Field(
        default=None,
        description="Where clients reach the S3 server when it differs from where nodes do: URLs are signed for it.",
    )
    secret: str | None = Field(
        default=None,
        description="The secret every node signs URLs and webhook secrets with (unset: one kept in the database).",
    )
    # SIGTERM to a worker: the running job may finish within this long, then it is given back.
    shutdown_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="SIGTERM to a worker: the running job may finish within this many seconds, then is given back.",
    )
    device: str = Field(
        default="auto", description="auto, cpu, cuda, cuda:1, mps; cuda:0,cuda:1 or all: a worker each."
    )
    url_ttl_s: int = Field(default=3600, ge=60, description="Lifetime of signed file URLs, in seconds.")
    max_attempts: int = Field(
        default=2, ge=1, description="Runs of a job before it fails (a dead worker's job is re-queued until then)."
    )
    # A worker's claim on a job lasts this long unless renewed (every quarter of it); a dead worker's
    # job is re-queued after at most this long.
    lease_s: float = Field(
        default=20.0,
        ge=0.2,
        description="A worker's claim on a job lasts this many seconds unless renewed (every quarter of it).",
    )
    # An object store that does not answer is waited for this long by a worker storing a job's images
    # (its lease is renewed meanwhile) before the job fails saying so; the API answers 503 at once.
    storage_retry_s: float = Field(
        default=60.0,
        ge=0,
        description="A worker waits this many seconds for an object store that does not answer before the job fails.",
    )
    # Niceness of the worker threads (and the torch threads they start): above 0, requests are served
    # before images are computed on a busy CPU. Measured (bench/load_accept.py, 2 cores, 200 clients):
    # 10 lowers accept p95 from ~5.2 s to ~4.1 s but takes 2.4x as long to finish the jobs, so 0.
    worker_nice: int = Field(
        default=0,
        ge=0,
        le=19,
        description="Niceness of worker threads (above 0, requests are served before images on a busy CPU).",
    )
    compile: bool = Field(default=False, description="torch.compile the transformer blocks (warmed up at start).")
    quantize: Literal["none", "fp8"] = Field(
        default="none", description="none or fp8 (torchao; lossy; compute capability 8.9+)."
    )
    attention: str = Field(default="auto", description="auto, native, flash, _flash_3, sage, ...")
    cache: str | None = Field(default=None, description="first-block[=THRESHOLD]: First-Block-Cache (lossy).")
    offload: Literal["none", "model", "group", "auto"] = Field(default="auto", description="auto, none, model, group.")
    vae_tiling: bool = Field(default=False, description="Decode large images in tiles.")
    warmup_sizes: list[str] = Field(
        default=["1024x1024"], description="With --compile: sizes compiled at start, comma-separated WxH."
    )
    webhook_retry_base_s: float = Field(
        default=1.0, gt=0, description="Webhook retries back off 1x, 2x, 4x, 8x this many seconds."
    )  # retries back off 1x, 2x, 4x, 8x this
    # Only for loading weights: hub ids resolve from the local cache, never the network.
    offline: bool = Field(
        default_factory=lambda: os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"),
        description="Load weights from local folders and the hub cache only (HF_HUB_OFFLINE).",
    )

    @field_validator("cors_origins", "warmup_sizes", "models", "preload", "safety_labels", mode="before")
    @classmethod
    def _split_lists(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lstrip().startswith("["):
            return json.loads(v)  # a JSON list, as pydantic-settings would decode it
        if isinstance(v, str):
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("secret", "api_key", "metrics_token")
    @classmethod
    def _not_an_example(cls, v: str | None) -> str | None:
        # The deploy files' placeholders and any value that says it is one: a known secret is no secret.
        if v is not None and any(mark in v.lower() for mark in ("change-me", "changeme", "replace-with", "example")):
            raise ValueError("this is an example value from the docs; set one of your own (openssl rand -hex 32)")
        return v

    @field_validator("memory_budget", "cpu_memory_budget", "file_bytes_per_key")
    @classmethod
    def _check_bytes(cls, v: str | None) -> str | None:
        if v is not None:
            parse_bytes(v)
        return v

    @field_validator("attention")
    @classmethod
    def _check_attention(cls, v: str) -> str:
        if v in ("auto", "native"):
            return v  # without importing diffusers: settings are built by every CLI command
        allowed = attention_backends()
        if allowed and v not in allowed:
            raise ValueError(f"attention must be one of {', '.join(allowed)}; got {v!r}")
        return v

    @field_validator("cache")
    @classmethod
    def _check_cache(cls, v: str | None) -> str | None:
        parse_cache(v)
        return v

    @field_validator("retention", mode="before")
    @classmethod
    def _check_retention(cls, v: Any) -> str:
        parse_retention(v)
        return str(v)

    @property
    def retention_s(self) -> float:
        return parse_retention(self.retention)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = os.environ.get("FLUXSERVE_CONFIG")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def database(self) -> str:
        """SQLAlchemy URL; a plain postgresql:// one gets psycopg 3 (the driver procrastinate uses)."""
        url = self.database_url or f"sqlite:///{self.data_dir / 'fluxserve.db'}"
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                return "postgresql+psycopg://" + url.removeprefix(plain)
        return url

    @property
    def on_postgres(self) -> bool:
        return self.database.startswith("postgresql")

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def lora_cache_dir(self) -> Path:
        return self.data_dir / "lora-cache"

    @property
    def demo_model_dir(self) -> Path:
        return self.data_dir / "demo-model"

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"
