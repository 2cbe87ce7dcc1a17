"""``[upstreams.NAME]`` tables: the hosted providers a deployment forwards to, read once at start."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

Kind = Literal["bfl", "replicate", "fal", "openai"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    kind: Kind
    base_url: str
    # The key is read from this variable when a request is made: never stored in the database or logged.
    api_key_env: str = ""
    max_in_flight: int = 16
    timeout_s: float = 600.0  # one job's whole upstream life: submit, polling and fetching the images
    poll_interval_s: float = 1.0
    # 429, 5xx and connection errors are retried this many times (exponential backoff from retry_base_s).
    retries: int = 3
    retry_base_s: float = 1.0
    # A submit whose answer was lost is sent again only when the provider dedupes on Idempotency-Key
    # (a fluxserve upstream does; BFL, Replicate and fal do not document one: a second task is a second charge).
    idempotent: bool = False
    unhealthy_after: int = 3  # consecutive failures that mark it unhealthy
    cooldown_s: float = 30.0  # skipped (its jobs fail over) for this long once unhealthy
    price: float | None = None  # credits per image for models routed here that set no price
    max_image_mb: int = 50  # the largest result image fetched from it

    @property
    def host(self) -> tuple[str, int]:
        """The one private address results may be fetched from: the operator named it."""
        parts = urlsplit(self.base_url)
        return (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def public(self) -> dict[str, Any]:
        """What /health and /v1/models show: never the key, nor the variable's value."""
        return {"name": self.name, "kind": self.kind, "max_in_flight": self.max_in_flight}


_FIELDS = {f.name for f in fields(UpstreamConfig)} - {"name"}


def parse_upstreams(tables: dict[str, Any], where: str) -> dict[str, UpstreamConfig]:
    """Validate every table loudly: a typo in an upstream's config is a start-up error, not a stuck job."""
    found: dict[str, UpstreamConfig] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"{where}: [upstreams.{name}] must be a table")
        unknown = set(table) - _FIELDS
        if unknown:
            raise ValueError(
                f"{where}: [upstreams.{name}] has unknown keys {sorted(unknown)}; allowed: {sorted(_FIELDS)}"
            )
        kind = table.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{where}: [upstreams.{name}] kind must be one of {', '.join(KINDS)}; got {kind!r}")
        url = table.get("base_url")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError(f"{where}: [upstreams.{name}] base_url must be an http(s) URL; got {url!r}")
        if "api_key" in table:
            raise ValueError(f"{where}: [upstreams.{name}] takes api_key_env (a variable's name), not the key")
        config = UpstreamConfig(name=name, **{**table, "base_url": url.rstrip("/")})
        if config.max_in_flight < 1 or config.timeout_s <= 0 or config.retries < 0 or config.poll_interval_s <= 0:
            raise ValueError(
                f"{where}: [upstreams.{name}] needs max_in_flight >= 1, timeout_s > 0, retries >= 0, "
                "poll_interval_s > 0"
            )
        found[name] = config
    return found


def reference_limit(kind: str, model: str) -> int | None:
    """How many reference images a provider kind's request shape carries for this upstream model (None: as
    many as the model takes). Replicate's FLUX schemas name one field each: Kontext and dev/schnell one image
    (``input_image``, ``image``), FLUX 1.1 [pro] none that fluxserve sends, FLUX.2 an ``input_images`` list
    (up to 8 on replicate.com). What a route cannot carry is refused at create, never dropped."""
    if kind != "replicate":
        return None
    name = model.rsplit("/", 1)[-1]
    if "kontext" in name or name in ("flux-dev", "flux-schnell"):
        return 1
    if name.startswith("flux-2"):
        return 8
    return 0
