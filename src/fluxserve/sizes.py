"""The one size parser, for memory budgets and the like."""

from __future__ import annotations


def parse_bytes(text: str) -> int:
    """``20GiB``, ``20GB``, ``512MiB``, ``1.5e10`` or plain bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number) :]
    if unit not in units:
        raise ValueError(f"{text!r}: a size in bytes, or with a unit ({', '.join(k for k in units if k)})")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"{text!r}: a size in bytes, or with a unit such as 20GiB or 512MB") from None
    if value < 0:
        raise ValueError(f"{text!r}: a size must not be negative")
    return int(value)


def human_bytes(n: int) -> str:
    """``23.8 GiB``, ``512.0 MiB``, ``698 KiB``: for messages and logs."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.0f} KiB" if n >= 2**10 else f"{n} B"
