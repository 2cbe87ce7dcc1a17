"""The one Server-Sent Events encoder (OpenAI's image streams, Replicate's prediction streams)."""

from __future__ import annotations


def sse_frame(event: str, data: str | bytes, event_id: int | None = None) -> bytes:
    """One event: its name, an id when given, and each line of ``data`` as a data: line."""
    body = data if isinstance(data, bytes) else data.encode()
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return head.encode() + b"".join(b"data: " + line + b"\n" for line in body.split(b"\n")) + b"\n"
