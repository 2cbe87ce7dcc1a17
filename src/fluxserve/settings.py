"""Settings: CLI flags > FLUXSERVE_* environment > optional TOML file > defaults."""

from __future__ import annotations

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


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "fluxserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(default_factory=_default_data_dir)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    public_url: str | None = None
    api_key: str | None = None
    demo: bool = False
    model_config_file: Path | None = Field(default=None, validation_alias="FLUXSERVE_MODEL_CONFIG")
    # [upstreams.NAME] tables and the [models.NAME] tables that route to them (fluxserve.upstream).
    upstream_config_file: Path | None = Field(default=None, validation_alias="FLUXSERVE_UPSTREAM_CONFIG")
    allow_private_urls: bool = False
    cors_origins: list[str] = ["*"]
    # The model names to serve (and load); empty: every name the registry has.
    models: list[str] = []
    # LoRA adapters: a folder requests name files in; fetched ones cached by content hash (LRU).
    lora_dir: Path | None = None
    lora_cache_gb: float = Field(default=10.0, gt=0)
    lora_max_mb: int = Field(default=2048, ge=1)  # one fetched adapter
    lora_slots: int = Field(default=4, ge=1, le=64)  # adapters kept loaded per pipeline
    # Under --compile, adapters go into hot-swap slots of this rank (0: no adapters with --compile).
    lora_max_rank: int = Field(default=0, ge=0, le=1024)
    # Images, inputs and previews are deleted this long after their job ended ('7d', '36h'; 0 keeps them).
    retention: str = "7d"
    retention_sweep_s: float = Field(default=60.0, gt=0)
    log_format: Literal["text", "json"] = "text"
    header_timeout_s: float = Field(default=10.0, gt=0)  # request headers not complete by then: 408
    body_idle_timeout_s: float = Field(default=30.0, gt=0)  # a request body that stalls this long: 408
    # /metrics answers loopback, and elsewhere this bearer token (or api_key when this is unset).
    metrics_token: str | None = None
    # Per-key limits (fluxserve.limits), defaults for keys without their own; 0 means no limit.
    max_queued_per_key: int = Field(default=1000, ge=0)
    rpm_per_key: int = Field(default=0, ge=0)
    images_per_day_per_key: int = Field(default=0, ge=0)
    max_batch: int = Field(default=8, ge=1, le=64)
    # None: by device (worker.default_batch_max_pixels); a number overrides it everywhere.
    batch_max_pixels: int | None = Field(default=None, ge=0)
    # zlib level for PNG outputs (lossless at any level). Measured on a 1024x1024 photo-like image
    # (2-core CPU): level 6 (Pillow's default) 349 ms and 1.71 MB, level 1 166 ms and 1.96 MB.
    png_compress_level: int = Field(default=1, ge=0, le=9)
    database_url: str | None = None
    # Past one machine (PostgreSQL): serve without workers (API nodes); where images live; the secret
    # every node signs URLs and derives webhook secrets with (else one kept in the database).
    api_only: bool = False
    storage: str | None = None  # file:///path (default: DATA_DIR/outputs) or s3://bucket/prefix
    s3_endpoint_url: str | None = None  # S3-compatible servers; the AWS_* variables give keys and region
    # Where clients reach that server when it differs from where the nodes do (containers: http://s3:9000
    # inside, http://localhost:9000 outside): presigned URLs are signed for this address.
    s3_public_url: str | None = None
    secret: str | None = None
    # SIGTERM to a worker: the running job may finish within this long, then it is given back.
    shutdown_grace_s: float = Field(default=60.0, ge=0)
    device: str = "auto"
    url_ttl_s: int = Field(default=3600, ge=60)
    max_attempts: int = Field(default=2, ge=1)
    # A worker's claim on a job lasts this long unless renewed (every quarter of it); a dead worker's
    # job is re-queued after at most this long.
    lease_s: float = Field(default=20.0, ge=0.2)
    # An object store that does not answer is waited for this long by a worker storing a job's images
    # (its lease is renewed meanwhile) before the job fails saying so; the API answers 503 at once.
    storage_retry_s: float = Field(default=60.0, ge=0)
    # Niceness of the worker threads (and the torch threads they start): above 0, requests are served
    # before images are computed on a busy CPU. Measured (bench/load_accept.py, 2 cores, 200 clients):
    # 10 lowers accept p95 from ~5.2 s to ~4.1 s but takes 2.4x as long to finish the jobs, so 0.
    worker_nice: int = Field(default=0, ge=0, le=19)
    compile: bool = False
    quantize: Literal["none", "fp8"] = "none"
    attention: str = "auto"
    cache: str | None = None
    offload: Literal["none", "model", "group", "auto"] = "auto"
    vae_tiling: bool = False
    warmup_sizes: list[str] = ["1024x1024"]
    webhook_retry_base_s: float = Field(default=1.0, gt=0)  # retries back off 1x, 2x, 4x, 8x this
    # Only for loading weights: hub ids resolve from the local cache, never the network.
    offline: bool = Field(default_factory=lambda: os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"))

    @field_validator("cors_origins", "warmup_sizes", "models", mode="before")
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.startswith("["):
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("attention")
    @classmethod
    def _check_attention(cls, v: str) -> str:
        if v in ("auto", "native"):
            return v  # without importing diffusers: settings are built by every CLI command
        from .engine.speed import attention_backends

        allowed = attention_backends()
        if allowed and v not in allowed:
            raise ValueError(f"attention must be one of {', '.join(allowed)}; got {v!r}")
        return v

    @field_validator("cache")
    @classmethod
    def _check_cache(cls, v: str | None) -> str | None:
        from .engine.speed import parse_cache

        parse_cache(v)
        return v

    @field_validator("retention", mode="before")
    @classmethod
    def _check_retention(cls, v: Any) -> str:
        from .retention import parse_retention

        parse_retention(v)
        return str(v)

    @property
    def retention_s(self) -> float:
        from .retention import parse_retention

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
