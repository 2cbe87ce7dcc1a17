"""Cursors for list endpoints (Replicate's predictions and files): opaque to clients, (created, id) to us."""

from __future__ import annotations

import base64
import json
import math

from ..errors import InvalidInput


def encode_cursor(created: float, item_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created, item_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if isinstance(created, bool) or not isinstance(created, int | float) or not isinstance(job_id, str):
            raise TypeError("not a (created, id) pair")
        if not math.isfinite(created):
            raise ValueError("created is not finite")
        return float(created), job_id
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # 10**400; JSON nested 3000 deep
        raise InvalidInput("cursor is not a cursor this server handed out.", param="cursor") from exc
