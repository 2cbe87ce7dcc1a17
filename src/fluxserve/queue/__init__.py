"""Where queued jobs wait and who runs them, behind one seam (base.py).

local.py: the jobs table, worker threads in this process (SQLite, one box). pg/: procrastinate on
PostgreSQL (rows.py: its SQL; runner.py: its workers, `fluxserve worker`; cluster.py: /health over the
workers registry); listen.py: other nodes' changes. store.fairness: the one order both fetch in.
``build`` chooses, once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..store import LocalHooks, QueueHooks

if TYPE_CHECKING:
    from ..jobs import JobService
    from ..settings import Settings
    from .base import Queue


def hooks(url: str) -> QueueHooks:
    """What the store of this database writes to its queue inside its own transactions: given to the store
    when it is built (app.store_options). Imports procrastinate only on PostgreSQL."""
    if url.startswith("postgresql"):
        from .pg.rows import PgHooks

        return PgHooks(url)
    return LocalHooks()


def build(settings: Settings, jobs: JobService) -> Queue:
    """The queue of this database over a store built with its hooks: what `serve`, `serve --api-only` and
    `worker` all call. Imports procrastinate only on PostgreSQL."""
    queue: Queue
    if settings.on_postgres:
        from .base import Timing
        from .pg import PgQueue

        queue = PgQueue(
            jobs.store, jobs, Timing(settings.lease_s, settings.shutdown_grace_s, settings.max_model_wait_s)
        )
    else:
        from .local import LocalQueue

        queue = LocalQueue(jobs)
    return queue
