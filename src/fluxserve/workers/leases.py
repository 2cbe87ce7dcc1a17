"""DeviceWorker: the only caller of a device's pipelines. It runs the jobs a queue hands it and knows no mode.

Handed a queued job's id (queue/local.py's loop or procrastinate's task), it claims the job under a
lease (JobService), renews the lease from a heartbeat thread, runs the engine, stores the images and
completes the job with a fenced write. It outlives every error of a job, the store and the storage:
store errors are retried with backoff while ``/health`` says ``degraded``, and the job is ended or
given back, never left processing.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import StoreUnavailable
from ..job import Job, WorkerState
from ..jobs import JobService
from ..storage import Storage, StorageUnreachable

log = logging.getLogger(__name__)
T = TypeVar("T")

STORE_RETRY_MAX_S = 5.0
STORAGE_FAILED = "The server could not store the image"
# An image that could not be marked (provenance on) is never stored: its job fails with this code.
PROVENANCE_FAILED = "The server could not mark the image as AI-generated"
PROVENANCE_CODE = "provenance_failed"


class _ShuttingDown(Exception):
    pass


def new_worker_id(device: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{device}:{secrets.token_hex(3)}"


def default_batch_max_pixels(device: str) -> int:
    """The largest image batched unless the operator says otherwise, from measurements per device.

    2-core CPU (bench/cpu_throughput.py): batches gave 1.46x throughput at 256x256 but 0.81x at
    1024x1024. H100 (bench/gpu_server.py, 8 clients at 512x512): 3.75 images/s batched vs 1.62
    unbatched. Larger sizes on a GPU, and other devices, were not measured: they keep the CPU's cap.
    """
    return 512 * 512 if device.startswith("cuda") else 320 * 320


# Asked at each step while a job runs: "user" (its queue entry was aborted), "shutdown", or None.
AbortCheck = Callable[[], str | None]
Lock = Callable[[Any, list[str]], list[str]]


class LeasedWorker:
    """What every worker shares: the lease heartbeat over the claims it holds, and what it does when the
    database is away: /health says degraded, and a write its job's outcome depends on is retried with
    backoff until made, giving up only when stopping (the job's lease then runs out and another claim
    re-runs it)."""

    concurrency: int
    route: str | None
    takes_claimed = False  # runs a job its create claimed for it (run_held; queue.local.LocalDispatcher.hand)

    def __init__(self, jobs: JobService, storage: Storage, device: str, *, storage_retry_s: float = 60.0) -> None:
        self._jobs = jobs
        self._storage = storage
        self.worker_id = new_worker_id(device)
        self.storage_retry_s = storage_retry_s  # how long an unreachable object store is waited for
        self.state: WorkerState = "loading"
        self.load_error: str | None = None
        self.degraded: str | None = None
        self.current_job: str | None = None
        # The claims it holds, by job id (a running batch, batches waiting for the encoder, upstream tasks),
        # renewed by the heartbeat; ``_lost``: held claims the heartbeat found taken.
        self._held: dict[str, Job] = {}
        self._lost: set[str] = set()
        self._held_lock = threading.Lock()
        self._stopping = threading.Event()
        self._heartbeat_stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(target=self._renew_leases, name="fluxserve-heartbeat", daemon=True)
        self._heartbeat.start()

    def begin_stop(self) -> None:
        """Nothing new is run; a running device batch gives its jobs back at its next step."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, timeout: float = 10.0) -> None:
        self.begin_stop()
        self._heartbeat_stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout)
        self.state = "stopped"

    def _renew_leases(self) -> None:
        """Heartbeat: leases stay fresh through long steps, model loads and image encoding."""
        interval = max(0.05, self._jobs.lease_s / 4)
        while not self._heartbeat_stop.wait(interval):
            with self._held_lock:
                held = list(self._held.values())
            if not held:
                self.idle()
                continue
            try:
                kept = self._jobs.renew(held, self.worker_id)
            except StoreUnavailable as exc:
                self.degrade(exc.message)
                continue
            with self._held_lock:
                # Finished meanwhile, or claimed again since (a later attempt), is not lost.
                lost = {j.id for j in held if j.id not in kept and self._held.get(j.id) is j}
                self._lost |= lost
            for job_id in lost:
                log.warning("worker %s lost its lease on job %s", self.worker_id, job_id)

    def idle(self) -> None:
        """Called by the heartbeat while the worker holds no job."""

    def observe(self, loaded: Callable[[str, float], None], evicted: Callable[[str], None]) -> None:
        """Metrics' callbacks for model loads and evictions (a device worker's engine calls them)."""

    max_model_wait_s = 0.0  # a device worker prefers jobs for its loaded models, this long at most

    @property
    def sleeping(self) -> bool:
        return False  # a device worker's engine can sleep (POST /sleep); others have nothing to free

    def sleep(self) -> None:
        """Free the device for another program; jobs stay queued."""

    def wake_up(self) -> None: ...

    def degrade(self, reason: str) -> None:
        if self.degraded is None:
            log.warning("worker %s degraded: %s", self.worker_id, reason)
        self.degraded = reason

    def recovered(self) -> None:
        if self.degraded is not None:
            log.warning("worker %s recovered from: %s", self.worker_id, self.degraded)
        self.degraded = None

    def _store(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        backoff = 0.25
        while True:
            try:
                result = fn(*args, **kwargs)
                self.recovered()
                return result
            except StoreUnavailable as exc:
                self.degrade(exc.message)
                if self._stopping.wait(backoff):
                    raise
                backoff = min(backoff * 2, STORE_RETRY_MAX_S)

    def _storage_io(self, fn: Callable[..., T], *args: Any) -> T:
        """An object store that is away (restarting, partitioned) is waited for, /health degraded meanwhile,
        up to storage_retry_s; then its error goes up and the job fails saying so. A full local disk is
        not retried: it is an OSError of another kind."""
        deadline = time.monotonic() + self.storage_retry_s
        backoff, failed = 0.5, False
        while True:
            try:
                result = fn(*args)
            except StorageUnreachable as exc:
                failed = True
                self.degrade(str(exc))
                if time.monotonic() + backoff > deadline or self._stopping.wait(backoff):
                    raise
                backoff = min(backoff * 2, STORE_RETRY_MAX_S)
                continue
            if failed:
                self.recovered()
            return result
