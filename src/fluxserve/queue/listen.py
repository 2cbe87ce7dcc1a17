"""LISTEN for job changes committed by other processes: waiters (sync OpenAI calls, SSE streams,
``Prefer: wait``) wake at once instead of at their next re-read, which stays as the fallback.

One autocommit connection per process, outside every pool (a pooled or PgBouncer transaction-mode
connection drops LISTEN); it reconnects with backoff, and a quiet connection is pinged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..store import NOTIFY_CHANNEL
from .pg.rows import libpq_url

log = logging.getLogger(__name__)

PING_S = 30.0


async def listen(url: str, on_change: Callable[[str, str, bool], None], ready: asyncio.Event | None = None) -> None:
    """Call ``on_change(job_id, event, hooked)`` for each notification, until cancelled; ``hooked``: the
    transition may have written webhook deliveries."""
    import psycopg

    backoff = 0.1
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(libpq_url(url, "listen"), autocommit=True) as conn:
                await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                backoff = 0.1
                if ready is not None:
                    ready.set()
                while True:
                    async for note in conn.notifies(timeout=PING_S):
                        job_id, _, event = note.payload.partition(":")
                        event, _, flag = event.partition(":")
                        on_change(job_id, event, flag == "w")
                    await conn.execute("SELECT 1")  # quiet for PING_S: is the connection still there?
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # psycopg.OperationalError and friends: the server went away
            log.warning("job notifications: %s; reconnecting in %.1f s (waiters re-read meanwhile)", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
