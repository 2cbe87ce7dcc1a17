"""GPU workers fed by procrastinate: `fluxserve worker`, and `serve` on PostgreSQL without --api-only.

One procrastinate worker per device (its slot count: 1 for a Worker, the only caller of its
pipelines), fetching from the queues of the models it loaded, after they loaded: a worker that fails to
load fetches nothing, so its models' jobs wait for a healthy one. The task claims our job row (the fence
is its attempt), takes compatible queued jobs into a batch (SKIP LOCKED on their queue rows), runs them,
and settles the batch's queue rows. A job given back (shutdown, lost lease) raises Requeue, which the
retry strategy turns into "to do, now".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ...errors import StoreUnavailable
from ...job import Status
from ...jobs import JobService
from ...store import Store, workers
from ..base import Timing, Worker
from .rows import TASK, PgRows, libpq_url, warm_queue, worker_queues

log = logging.getLogger(__name__)

# Connections a worker process holds: procrastinate's pool (fetch, heartbeat, finish) up to POOL_MAX, its
# LISTEN connection, and our pool for job rows, leases, the worker rows and sweeps (WORKER_POOL, no overflow:
# its threads are the task, the lease heartbeat, the worker rows' beat and the sweep).
POOL_MAX = 3
WORKER_POOL = 4


class Requeue(Exception):
    """The job went back to the queue (clean shutdown, or its lease was taken): its queue row too."""


class HandOff(Exception):
    """A job for a model this worker has not loaded, while another worker that has it runs nothing: its queue
    row goes to that worker's own queue (rows.warm_queue) instead of this worker loading the model."""

    def __init__(self, queue: str) -> None:
        super().__init__(queue)
        self.queue = queue


def hand_off_to(job: Any, device: Worker, rows: WorkerRows, queue: PgRows, fetched_from: str) -> str | None:
    """Where a fetched job should run instead of here (a warm worker's queue), or None: run it here.

    Here when its model is loaded here, when it already waited ``max_model_wait_s`` (the preference never
    holds a job longer), when it was handed to this worker, or when no free worker has it warm."""
    model = job.spec.model
    if job.route is not None or model in device.loaded_models() or fetched_from == warm_queue(device.worker_id):
        return None
    if time.time() - job.created_at >= getattr(device, "max_model_wait_s", 0.0):
        return None
    target = queue.warm_elsewhere(model, device.worker_id, rows.fresh_s)
    return warm_queue(target) if target else None


def worker_app(url: str) -> Any:
    """A procrastinate App with our task, for running workers (opened async; sync calls use pg.PgRows's)."""
    import procrastinate
    from procrastinate.exceptions import JobAborted
    from procrastinate.job_context import AbortReason, JobContext
    from procrastinate.retry import BaseRetryStrategy, RetryDecision

    class RequeueAtOnce(BaseRetryStrategy):
        def get_retry_decision(self, *, exception: BaseException, job: Any) -> RetryDecision | None:
            if isinstance(exception, HandOff):
                return RetryDecision(retry_in={"seconds": 0}, queue=exception.queue)
            return RetryDecision(retry_in={"seconds": 0}) if isinstance(exception, Requeue) else None

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=libpq_url(url, "worker"), min_size=1, max_size=POOL_MAX)
    )

    def generate(context: JobContext, job_id: str) -> None:
        device: Worker = context.additional_context["device_worker"]
        queue: PgRows = context.additional_context["queue"]
        rows: WorkerRows = context.additional_context["rows"]
        job = queue.store.get_job(job_id)
        if job is not None and job.status is Status.QUEUED:
            target = hand_off_to(job, device, rows, queue, str(context.job.queue))
            if target is not None:
                log.info("job %s: %s is warm on another worker: handed to %s", job_id, job.spec.model, target)
                # procrastinate's retry commits just after the task returns and notifies nobody: wake the target.
                threading.Timer(0.2, queue.notify, args=(target,)).start()
                raise HandOff(target)

        def abort() -> str | None:
            if not context.should_abort():
                return None
            return "shutdown" if context.abort_reason() == AbortReason.SHUTDOWN else "user"

        rows.beat_one(device, job_id)  # busy now: no hand-offs to this worker meanwhile
        try:
            batch = device.run_claimed(job_id, queue.member_lock(context.job.worker_id), abort)
        finally:
            rows.beat_one(device, None)  # free again, and what it has loaded now
        queue.settle([j.id for j in batch[1:]])
        lead = queue.store.get_job(job_id)
        if lead is not None and lead.status is Status.QUEUED:
            raise Requeue(job_id)
        if lead is not None and lead.status is Status.CANCELED:
            raise JobAborted(job_id)

    app.task(name=TASK, pass_context=True, retry=RequeueAtOnce())(generate)
    return app


class WorkerRows:
    """This process's rows in fluxserve_workers: what /health on every node shows."""

    def __init__(self, store: Store, devices: Sequence[Worker], models: list[str], timing: Timing) -> None:
        self.store = store
        self.devices = devices
        self.models = models
        self.started = time.time()
        self.fresh_s = timing.lease_s  # a row older than that is a worker that stopped beating

    def beat(self) -> None:
        with self.store.transaction() as conn:
            for d in self.devices:
                self._upsert(conn, d, d.current_job)

    def beat_one(self, device: Worker, current_job: str | None) -> None:
        """Its row now, not at the next beat: a job started or ended (hand-offs read it)."""
        with contextlib.suppress(StoreUnavailable), self.store.transaction() as conn:
            self._upsert(conn, device, current_job)

    def _upsert(self, conn: Any, d: Worker, current_job: str | None) -> None:
        warm = d.loaded_models()
        row = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": d.device,
            "models": json.dumps(warm or self.models),
            "warm": json.dumps(warm),
            "state": d.state,
            "error": d.load_error,
            "current_job": current_job,
            "last_seen": time.time(),
        }
        stmt = pg_insert(workers).values(id=d.worker_id, started_at=self.started, **row)
        conn.execute(stmt.on_conflict_do_update(index_elements=[workers.c.id], set_=row))

    def leave(self) -> None:
        with self.store.transaction() as conn:
            conn.execute(delete(workers).where(workers.c.id.in_([d.worker_id for d in self.devices])))


async def sweep_forever(jobs: JobService, queue: PgRows, timing: Timing) -> None:
    """Expired leases and Cancel-After deadlines (JobService.expire), then stalled queue rows; on every node,
    one sweep at a time (advisory lock)."""
    while True:
        await asyncio.sleep(timing.heartbeat_s)
        try:
            await asyncio.to_thread(jobs.expire)
            await asyncio.to_thread(jobs.spill)
            await asyncio.to_thread(queue.sweep, timing.lease_s, timing.model_wait_s)
        except StoreUnavailable as exc:
            log.warning("queue sweep skipped: %s", exc.message)
        except Exception:  # the sweeper outlives any one bad row
            log.exception("queue sweep failed")


async def run_devices(
    url: str,
    jobs: JobService,
    queue: PgRows,
    devices: Sequence[Worker],
    models: list[str],
    timing: Timing,
    stop: asyncio.Event,
    stop_now: asyncio.Event,
    *,
    sweep: bool = True,
) -> int:
    """Load, then fetch until ``stop`` (finish the running job within grace_s; past it, or on ``stop_now``,
    give it back). Returns the exit status: 1 when no device loaded."""
    slots = sum(d.concurrency for d in devices)
    if slots > 1:  # procrastinate runs each sync task on the loop's default executor: one thread per slot
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=slots + 8, thread_name_prefix="fluxserve-task")
        )
    rows = WorkerRows(jobs.store, devices, models, timing)
    beats = asyncio.create_task(_beat_forever(rows, timing))  # "loading" shows on /health meanwhile
    loaded = await asyncio.gather(*(asyncio.to_thread(d.load) for d in devices))
    with contextlib.suppress(StoreUnavailable):  # ready (or failed) shows now, not at the next beat
        await asyncio.to_thread(rows.beat)
    try:
        ready = [d for d, ok in zip(devices, loaded, strict=True) if ok]
        if not ready:
            log.error("no device loaded its models; this worker takes no jobs")
            return 1
        for d in ready:
            d.start_heartbeat()
        app = worker_app(url)
        async with app.open_async():
            runs = [
                asyncio.create_task(
                    app.run_worker_async(
                        queues=worker_queues(d),
                        name=d.worker_id,
                        concurrency=d.concurrency,
                        wait=True,
                        install_signal_handlers=False,
                        listen_notify=True,
                        delete_jobs="never",
                        update_heartbeat_interval=timing.heartbeat_s,
                        stalled_worker_timeout=timing.lease_s,
                        fetch_job_polling_interval=max(1.0, timing.lease_s / 4),
                        abort_job_polling_interval=1.0,
                        shutdown_graceful_timeout=timing.grace_s,
                        additional_context={"device_worker": d, "queue": queue, "rows": rows},
                    )
                )
                for d in ready
            ]
            # `serve` runs its sweep beside the API; a worker process runs its own.
            sweeper = asyncio.create_task(sweep_forever(jobs, queue, timing)) if sweep else None
            await stop.wait()
            log.info("stopping: the running job may finish within %.0f s, queued jobs stay queued", timing.grace_s)
            if sweeper is not None:
                sweeper.cancel()
            for run in runs:
                run.cancel()  # procrastinate's graceful stop: no new fetches, the running job finishes

            async def give_back() -> None:
                await stop_now.wait()
                for d in ready:
                    d.begin_stop()  # the next step raises: the job is re-queued, its attempt given back

            hurry = asyncio.create_task(give_back())
            await asyncio.gather(*runs, return_exceptions=True)
            hurry.cancel()
        return 0
    finally:
        beats.cancel()
        for d in devices:
            d.stop(timeout=5)
        with contextlib.suppress(StoreUnavailable):
            await asyncio.to_thread(rows.leave)


async def _beat_forever(rows: WorkerRows, timing: Timing) -> None:
    while True:
        try:
            await asyncio.to_thread(rows.beat)
        except StoreUnavailable as exc:
            log.warning("worker registry: %s", exc.message)
        await asyncio.sleep(timing.heartbeat_s)


def install_stop_signals(stop: asyncio.Event, stop_now: asyncio.Event) -> None:
    """SIGTERM/SIGINT once: graceful stop; twice: give the running job back now."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        (stop_now if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
