"""What an API node on PostgreSQL says about its workers: the ones seen through the database (any node),
plus its own in-process workers when it runs some (`serve` without --api-only)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select

from ...errors import StoreUnavailable
from ...job import Job, WorkerState
from ...jobs import JobService
from ...store import Store, workers
from ..base import Timing, Worker
from .rows import PgRows, queue_depths
from .runner import run_devices

log = logging.getLogger(__name__)


class ClusterView:
    """A Dispatcher (worker.Dispatcher) over the fluxserve_workers rows, refreshed in the background."""

    def __init__(self, store: Store, timing: Timing, local: LocalQueueWorkers | None = None) -> None:
        self._store = store
        self._timing = timing
        self._local = local
        self.workers: list[dict[str, Any]] = []
        self.queues: dict[str, int] = {}
        self.degraded: str | None = None

    def refresh(self) -> None:
        """Workers heard from within two lease periods, and the queues' depths."""
        try:
            with self._store.transaction() as conn:
                fresh = time.time() - 2 * self._timing.lease_s
                rows = conn.execute(select(workers).where(workers.c.last_seen >= fresh).order_by(workers.c.id)).all()
                self.queues = queue_depths(conn)
            self.degraded = None
        except StoreUnavailable as exc:
            self.degraded = exc.message
            return
        now = time.time()
        self.workers = [
            {
                "id": r.id,
                "host": r.host,
                "pid": r.pid,
                "device": r.device,
                "models": json.loads(r.models),
                "state": r.state,
                "error": r.error,
                "current_job": r.current_job,
                "last_heartbeat_s_ago": round(now - r.last_seen, 2),
            }
            for r in rows
        ]

    @property
    def state(self) -> WorkerState:
        states = {w["state"] for w in self.workers}
        if self._local is not None and self._local.state in ("loading", "ready"):
            return self._local.state  # this node's own, fresher than its rows' last refresh
        if "ready" in states:
            return "ready"
        if "loading" in states:
            return "loading"
        if self._local is not None:
            return self._local.state
        # An API node alone still takes jobs: they wait in the queue for a worker.
        return "ready"

    @property
    def load_error(self) -> str | None:
        errors = {w["id"]: w["error"] for w in self.workers if w["error"]}
        if self._local is not None:  # this node's own, before the registry's next refresh
            errors |= self._local.load_errors()
        return "; ".join(f"{worker}: {error}" for worker, error in sorted(errors.items())) or None

    def start(self) -> None:
        if self._local is not None:
            self._local.start()

    def wake(self, job: Job | None = None) -> None:
        """Procrastinate's own NOTIFY wakes workers on every node."""

    def stop(self, timeout: float = 10.0) -> None:
        if self._local is not None:
            self._local.stop(timeout)

    def loaded_models(self) -> list[str]:
        local = self._local.loaded_models() if self._local is not None else []
        return sorted({*local, *(m for w in self.workers if w["state"] == "ready" for m in w["models"])})

    def local_workers(self) -> list[Worker]:
        return list(self._local.devices) if self._local is not None else []

    def engine_info(self) -> dict[str, Any]:
        body: dict[str, Any] = {"workers": self.workers, "queues": self.queues}
        if not self.workers:
            body["note"] = "no worker seen: jobs wait in their model's queue until `fluxserve worker` runs"
        return body


class LocalQueueWorkers:
    """`serve` on PostgreSQL: this process's devices as queue workers, on a thread with its own event loop."""

    def __init__(
        self,
        url: str,
        jobs: JobService,
        queue: PgRows,
        devices: Sequence[Worker],
        models: list[str],
        timing: Timing,
    ) -> None:
        self._run: Callable[[asyncio.Event, asyncio.Event], Any] = lambda stop, now: run_devices(
            url, jobs, queue, devices, models, timing, stop, now, sweep=False
        )
        self.devices = devices
        self._grace_s = timing.grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_now: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="fluxserve-queue-workers", daemon=True)
        self._ready = threading.Event()

    def loaded_models(self) -> list[str]:
        return sorted({m for d in self.devices for m in d.loaded_models()})

    def load_errors(self) -> dict[str, str]:
        return {d.worker_id: d.load_error for d in self.devices if d.load_error}

    @property
    def state(self) -> WorkerState:
        states = [d.state for d in self.devices]
        return "ready" if "ready" in states else ("loading" if "loading" in states else "error")

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop, self._stop_now = asyncio.Event(), asyncio.Event()
            self._ready.set()
            await self._run(self._stop, self._stop_now)

        asyncio.run(main())

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._stop is None or self._stop_now is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self._grace_s)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop_now.set)
            self._thread.join(timeout)
