"""The PostgreSQL queue: procrastinate's tables beside ours. ``rows`` is the SQL (the store's hooks and what
workers and sweepers do to queue rows); ``runner`` runs procrastinate workers for this process's devices;
``cluster`` is /health's view of every worker; ``PgQueue`` here puts them together behind queue.base.Queue."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any

from ...jobs import JobService
from ..base import Timing, Worker
from .cluster import ClusterView, LocalQueueWorkers
from .rows import PgRows, models_of
from .runner import run_devices, sweep_forever


class PgQueue(PgRows):
    # -- the Queue seam (queue.base.Queue) ------------------------------------------

    def _wired(self) -> tuple[JobService, Timing]:
        assert self.jobs is not None and self.timing is not None, "built by queue.build"
        return self.jobs, self.timing

    def dispatcher(self, workers: Sequence[Worker] | None) -> ClusterView:
        """The workers seen through the database, plus this node's own queue workers (`serve` without
        --api-only), which run on a thread of their own."""
        jobs, timing = self._wired()
        local = None
        if workers:
            local = LocalQueueWorkers(self.store.url, jobs, self, workers, models_of(workers), timing)
        self.view = ClusterView(self.store, timing, local)
        return self.view

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """The /health view's refresh and the stall sweep (one node at a time)."""
        jobs, timing = self._wired()
        view = self.view

        async def refresh_forever() -> None:
            while True:
                await asyncio.to_thread(view.refresh)
                await asyncio.sleep(timing.heartbeat_s)

        return [refresh_forever(), sweep_forever(jobs, self, timing)]

    async def run_workers(self, workers: Sequence[Any], stop: asyncio.Event, stop_now: asyncio.Event) -> int:
        jobs, timing = self._wired()
        return await run_devices(self.store.url, jobs, self, workers, models_of(workers), timing, stop, stop_now)


__all__ = ["PgQueue", "PgRows"]
