"""The one duration parser: Go-style durations ('30s', '5m', '1h30m', '500ms', '7d'), or bare seconds."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str | float, *, bare_seconds: bool = False, days: bool = False) -> float:
    """Seconds in ``value``; a plain number counts as seconds only where ``bare_seconds``, 'd' only
    where ``days`` (Go's durations, which Replicate's headers follow, stop at hours).

    Raises ValueError for anything else; callers word the message for their own field.
    """
    text = str(value).strip()
    if bare_seconds and re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text or (not days and any(u == "d" for _, u in parts)):
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def parse_retention(value: str | int | float) -> float:
    """'7d', '36h', '90m', '3600s' or plain seconds; 0 keeps files forever."""
    try:
        return parse_duration(str(value).lower(), bare_seconds=True, days=True)
    except ValueError:
        raise ValueError(f"retention must be a duration such as 7d, 36h or 0 (keep forever); got {value!r}") from None
