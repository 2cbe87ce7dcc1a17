"""The embedded queue: the jobs table is the queue, and worker threads in this process take from it.

Every slot of every worker (DeviceWorker: one) runs a loop: the lease and deadline sweep
(JobService.expire) at most every MAINTENANCE_S, then the next queued jobs in the fair order
(store.fairness), each handed to the worker, which claims it (another slot may have been first) and
runs it. A submit or re-queue in this process wakes the loops at once; otherwise they look again every
MAINTENANCE_S. A worker whose models failed to load leaves jobs to healthy ones, and fails them itself
(with its load error) only when none is left.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from ..errors import StoreUnavailable
from ..job import WorkerState
from ..jobs import JobService

AnyWorker = Any  # a worker.DeviceWorker or an upstream.worker.UpstreamWorker (queue.base.Worker)

log = logging.getLogger(__name__)

MAINTENANCE_S = 1.0
STORE_RETRY_MAX_S = 5.0
CANDIDATES = 16  # queued ids read per look; the first still queued is claimed


class LocalQueue:
    name = "local"

    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs

    def dispatcher(self, workers: Sequence[AnyWorker] | None) -> LocalDispatcher:
        return LocalDispatcher(self.jobs, list(workers or ()))

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return []  # the worker loops sweep

    async def run_workers(self, workers: Sequence[Any], stop: asyncio.Event, stop_now: asyncio.Event) -> int:
        dispatcher = self.dispatcher(workers)
        dispatcher.start()
        try:
            await stop.wait()
        finally:
            await asyncio.to_thread(dispatcher.stop)
        return 0 if dispatcher.state != "error" else 1


class LocalDispatcher:
    """The app's face of this process's workers (queue.base.Dispatcher), each slot a thread."""

    def __init__(self, jobs: JobService, workers: list[AnyWorker]) -> None:
        self._jobs = jobs
        self.workers = workers
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_maintenance = 0.0
        self._maintenance_lock = threading.Lock()

    @property
    def state(self) -> WorkerState:
        states = [w.state for w in self.workers]
        if "ready" in states and "loading" not in states:
            return "ready"
        if "loading" in states:
            return "loading"
        return "error" if "error" in states else "stopped"

    @property
    def load_error(self) -> str | None:
        errors = [f"{i}: {w.load_error}" for i, w in enumerate(self.workers) if w.load_error]
        return "; ".join(errors) or None

    @property
    def degraded(self) -> str | None:
        reasons = sorted({w.degraded for w in self.workers if w.degraded})
        return "; ".join(reasons) or None

    def start(self) -> None:
        for worker in self.workers:
            thread = threading.Thread(target=self._serve, args=(worker,), name="fluxserve-worker", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        for w in self.workers:
            w.begin_stop()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        for w in self.workers:
            w.stop(timeout)

    def loaded_models(self) -> list[str]:
        return sorted({m for w in self.workers for m in w.loaded_models()})

    def local_workers(self) -> list[AnyWorker]:
        return list(self.workers)

    def engine_info(self) -> dict[str, Any]:
        infos = [w.engine_info() | {"state": w.state} for w in self.workers]
        return infos[0] if len(infos) == 1 else {"workers": infos}

    # -- a worker's loop ---------------------------------------------------------

    def _serve(self, worker: AnyWorker) -> None:
        worker.lower_priority()
        worker.load()
        worker.start_heartbeat()
        slots = [
            threading.Thread(target=self._loop, args=(worker,), daemon=True) for _ in range(worker.concurrency - 1)
        ]
        for slot in slots:
            slot.start()
        self._loop(worker)
        for slot in slots:
            slot.join()

    def _loop(self, worker: AnyWorker) -> None:
        backoff = 0.25
        while not self._stopping.is_set():
            try:
                ran = self._run_next(worker)
            except StoreUnavailable as exc:
                worker.degrade(exc.message)
                self._wake.wait(backoff)
                backoff = min(backoff * 2, STORE_RETRY_MAX_S)
                continue
            except Exception:  # the loop must outlive anything a job or the store throws
                log.exception("worker loop error")
                self._wake.wait(1.0)
                continue
            worker.recovered()
            backoff = 0.25
            if not ran:
                self._wake.wait(timeout=MAINTENANCE_S)
                self._wake.clear()

    def _others_healthy(self, worker: AnyWorker) -> bool:
        """Another worker that can take this one's jobs (the same route: devices, or the same upstream)."""
        live = ("loading", "ready")
        return any(o.state in live for o in self.workers if o is not worker and o.route == worker.route)

    def _run_next(self, worker: AnyWorker) -> bool:
        """Sweep when due, then run the first queued job this worker can claim; whether one ran."""
        with self._maintenance_lock:
            now = time.monotonic()
            due = now - self._last_maintenance >= MAINTENANCE_S
            if due:
                self._last_maintenance = now
        if due:
            self._jobs.expire()
            self._jobs.spill()
        if worker.state == "error" and self._others_healthy(worker):
            return False
        if worker.sleeping:
            return False  # POST /sleep: jobs stay queued until /wake_up
        queued = self._jobs.store.queued(limit=CANDIDATES, models=worker.models(), route=worker.route)
        for job_id in warm_first(queued, worker.loaded_models(), worker.max_model_wait_s, time.time()):
            if self._stopping.is_set():
                return False
            if worker.run_claimed(job_id):
                return True
        return False


def warm_first(
    queued: Sequence[tuple[str, str, Any, float]], loaded: Sequence[str], max_wait_s: float, now: float
) -> list[str]:
    """The candidates' ids in the order to try them: jobs for a loaded model before the rest (no reload
    between them), unless a job for another model has waited ``max_wait_s`` or more: then the fair order.

    ``queued``: (id, model, spec, created_at) in the fair order (store.fairness)."""
    if max_wait_s <= 0 or not loaded:
        return [job_id for job_id, *_ in queued]
    warm = set(loaded)
    overdue = any(model not in warm and now - created >= max_wait_s for _, model, _, created in queued)
    if overdue:
        return [job_id for job_id, *_ in queued]
    return [j for j, m, *_ in queued if m in warm] + [j for j, m, *_ in queued if m not in warm]
