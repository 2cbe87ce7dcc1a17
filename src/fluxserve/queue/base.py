"""The queue seam: where queued jobs wait and who hands them to workers.

Two implementations, chosen once by ``queue.build`` (the wiring every process runs): ``local.LocalQueue``
(the jobs table itself, worker threads in this process; SQLite or one box) and ``pg.PgQueue``
(procrastinate on PostgreSQL, workers in any process). The store calls the three hooks inside its own
transactions, so a queue entry commits with its job row or neither does. A ``Worker`` only runs the job
it is handed; ``concurrency`` is how many it runs at once (1 for a device, many for a remote one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, Literal, Protocol

from sqlalchemy.engine import Connection

from ..job import Job

WorkerState = Literal["loading", "ready", "error", "stopped"]


class Worker(Protocol):
    """What a queue needs of a worker (worker.DeviceWorker is one)."""

    worker_id: str
    concurrency: int
    state: WorkerState
    route: str | None  # the upstream it runs jobs on (upstream.worker.UpstreamWorker); None: a device

    def load(self) -> bool: ...
    def models(self) -> list[str]: ...
    def run_claimed(self, job_id: str, lock: Any = None, abort: Any = None) -> list[Job]: ...


class Dispatcher(Protocol):
    """What the app shows and starts of the workers a queue feeds (/health, start, stop)."""

    @property
    def state(self) -> WorkerState: ...
    @property
    def load_error(self) -> str | None: ...
    @property
    def degraded(self) -> str | None: ...

    def start(self) -> None: ...
    def wake(self) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...
    def loaded_models(self) -> list[str]: ...
    def engine_info(self) -> dict[str, Any]: ...


class QueueHooks(Protocol):
    """What the store asks of its queue, inside the store's own transactions."""

    def deferred(self, conn: Connection, job: Job, priority: int) -> None: ...
    def cancel(self, conn: Connection, job_id: str) -> None: ...
    def rerouted(self, conn: Connection, job: Job) -> None: ...
    def position(self, conn: Connection, job_id: str) -> int | None: ...


class Queue(QueueHooks, Protocol):
    name: str  # "local" or "postgres"

    def dispatcher(self, workers: Sequence[Any] | None) -> Dispatcher:
        """What the app shows and starts: these workers fed by this queue (None: an API node, no workers)."""
        ...

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """Loops an API process runs beside its routes (sweeps, cluster view refresh)."""
        ...

    async def run_workers(self, workers: Sequence[Any], stop: asyncio.Event, stop_now: asyncio.Event) -> int:
        """`fluxserve worker`: load, then run handed jobs until ``stop``; the exit status."""
        ...
