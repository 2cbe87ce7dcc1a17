"""Per-key limits: queued jobs, creates per minute, images per UTC day.

Counted from the jobs table inside the insert's own transaction, so they hold across API nodes
and restarts; nothing is counted in process memory. A key's own setting overrides the server
default; 0 means no limit for that key.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta

from .errors import RateLimited

# The create responses' x-ratelimit-* headers: the HTTP layer puts a dict here per request, the
# job service fills it after an admitted insert (a mutable holder, so thread hops don't lose it).
RATE_HEADERS: ContextVar[dict[str, str] | None] = ContextVar("fluxserve_rate_headers", default=None)


@dataclass(frozen=True)
class Limits:
    max_queued: int | None = None  # jobs queued or running
    rpm: int | None = None  # creates in the last 60 s
    images_per_day: int | None = None  # images asked for since 00:00 UTC

    def over(self, key: Limits) -> Limits:
        """This key's own values where it has them, else these (the server's defaults)."""
        return replace(self, **{f.name: getattr(key, f.name) for f in fields(key) if getattr(key, f.name) is not None})

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class Usage:
    active: int
    last_minute: int
    oldest_in_minute: float | None
    images_today: int


def day_start(now: float) -> float:
    return datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def admit(limits: Limits, usage: Usage, images: int, now: float) -> dict[str, str]:
    """The x-ratelimit-* headers for an admitted create, or RateLimited naming the limit."""
    headers: dict[str, str] = {}
    refused: list[tuple[str, int]] = []
    minute_reset = max(1, math.ceil((usage.oldest_in_minute or now) + 60 - now))
    day_reset = max(1, math.ceil((datetime.fromtimestamp(day_start(now), UTC) + timedelta(days=1)).timestamp() - now))
    if limits.rpm:
        headers |= _headers("requests", limits.rpm, limits.rpm - usage.last_minute - 1, minute_reset)
        if usage.last_minute + 1 > limits.rpm:
            refused.append((f"{limits.rpm} requests per minute", minute_reset))
    if limits.images_per_day:
        headers |= _headers(
            "images", limits.images_per_day, limits.images_per_day - usage.images_today - images, day_reset
        )
        if usage.images_today + images > limits.images_per_day:
            refused.append((f"{limits.images_per_day} images per day (UTC); {usage.images_today} used", day_reset))
    if limits.max_queued:
        headers |= _headers("queued", limits.max_queued, limits.max_queued - usage.active - 1, 2)
        if usage.active + 1 > limits.max_queued:
            refused.append((f"{limits.max_queued} jobs queued or running at once", 2))
    if refused:
        what = "; ".join(w for w, _ in refused)
        retry = max(s for _, s in refused)
        raise RateLimited(
            f"Rate limit reached for this API key: {what}. Retry after {retry} s.", retry_after=retry, headers=headers
        )
    return headers


def _headers(name: str, limit: int, remaining: int, reset_s: int) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{name}": str(limit),
        f"x-ratelimit-remaining-{name}": str(max(0, remaining)),
        f"x-ratelimit-reset-{name}": f"{reset_s}s",
    }


def note(headers: dict[str, str]) -> None:
    holder = RATE_HEADERS.get()
    if holder is not None:
        holder.update(headers)
