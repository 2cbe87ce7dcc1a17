"""The queue seam: where queued jobs wait and who hands them to workers.

Two implementations, chosen once by ``queue.build`` (the wiring every process runs): ``local.LocalQueue``
(the jobs table itself, worker threads in this process; SQLite or one box) and ``pg.PgQueue``
(procrastinate on PostgreSQL, workers in any process). The store is built with its queue's hooks
(``queue.hooks``: store.hooks.QueueHooks) and calls them inside its own transactions, so a queue entry commits
with its job row or neither does. A ``Worker`` only runs the job
it is handed; ``concurrency`` is how many it runs at once (1 for a device, many for a remote one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..job import Job, WorkerState


class Worker(Protocol):
    """What a queue needs of a worker (worker.DeviceWorker is one)."""

    worker_id: str
    concurrency: int
    state: WorkerState
    route: str | None  # the upstream it runs jobs on (upstream.worker.UpstreamWorker); None: a device
    max_model_wait_s: float  # how long a job may wait while the worker prefers its loaded models' jobs
    takes_claimed: bool  # True: ``run_held(job)`` runs a job its create claimed for it (queue.local)

    load_error: str | None
    current_job: str | None

    @property
    def device(self) -> str: ...

    def load(self) -> bool: ...
    def models(self) -> list[str]: ...
    def loaded_models(self) -> list[str]: ...
    def engine_info(self) -> dict[str, Any]: ...
    def run_claimed(self, job_id: str, lock: Any = None, abort: Any = None) -> list[Job]: ...
    def start_heartbeat(self) -> None: ...
    def begin_stop(self) -> None: ...
    @property
    def sleeping(self) -> bool: ...
    def sleep(self) -> None: ...
    def wake_up(self) -> None: ...
    def observe(self, loaded: Any, evicted: Any) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...


class Dispatcher(Protocol):
    """What the app shows and starts of the workers a queue feeds (/health, start, stop)."""

    @property
    def state(self) -> WorkerState: ...
    @property
    def load_error(self) -> str | None: ...
    @property
    def degraded(self) -> str | None: ...

    def start(self) -> None: ...
    def wake(self, job: Job | None = None) -> None:
        """Queued work to look at: this job (one slot that can run it looks), or any (None)."""
        ...

    def stop(self, timeout: float = 10.0) -> None: ...
    def loaded_models(self) -> list[str]: ...
    def engine_info(self) -> dict[str, Any]: ...
    def local_workers(self) -> list[Worker]:
        """This process's workers (POST /sleep reaches these; other nodes have their own)."""
        ...


class Queue(Protocol):
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


@dataclass(frozen=True)
class Timing:
    """Liveness: leases are renewed every lease_s / 4, and a worker silent for lease_s is stalled."""

    lease_s: float
    grace_s: float  # SIGTERM: how long the running job may take to finish
    model_wait_s: float = 30.0  # the longest a job waits for a worker that has its model warm

    @property
    def heartbeat_s(self) -> float:
        return max(0.1, self.lease_s / 4)
