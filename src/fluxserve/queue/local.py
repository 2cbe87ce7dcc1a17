"""The embedded queue: the jobs table is the queue, and worker threads in this process take from it.

Every slot of every worker (DeviceWorker: one; UpstreamWorker: its max_in_flight) is a thread that, when
woken, takes the next queued jobs in the fair order (store.fairness), each handed to the worker, which claims
it (another worker may have been first) and runs it. A submit or re-queue in this process wakes one idle slot
of one worker that can run the job; a maintenance thread sweeps leases and deadlines (JobService.expire) every
MAINTENANCE_S. A worker whose models failed to load leaves jobs to healthy ones, and fails them itself (with
its load error) only when none is left.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import Any

from ..errors import StoreUnavailable
from ..job import Job, Status, WorkerState
from ..jobs import JobService

AnyWorker = Any  # a worker.DeviceWorker or an upstream.worker.UpstreamWorker (queue.base.Worker)

log = logging.getLogger(__name__)

MAINTENANCE_S = 1.0  # the lease and deadline sweep
SWEEP_S = 5.0  # one slot per worker looks, for a wake-up lost (a job committed by another process)
STORE_RETRY_MAX_S = 5.0
CANDIDATES = 16  # queued ids read per look; the first still queued is claimed


class LocalQueue:
    name = "local"

    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs

    def dispatcher(self, workers: Sequence[AnyWorker] | None) -> LocalDispatcher:
        dispatcher = LocalDispatcher(self.jobs, list(workers or ()))
        self.jobs.take_at_create(dispatcher)  # a create that an idle slot here can run claims it for that slot
        return dispatcher

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
    """The app's face of this process's workers (queue.base.Dispatcher), each slot a thread.

    Slots wait on their own event, listed as idle per worker; a new job wakes one idle slot of one worker
    that can run it (its route and model; a warm one first), never every slot. A slot that finds a job keeps
    looking until none is left, then lists itself idle again. Nothing polls at idle: one maintenance thread
    sweeps leases and deadlines every MAINTENANCE_S and, every SWEEP_S, wakes one slot per worker in case a
    wake-up was lost (a job committed by another process)."""

    def __init__(self, jobs: JobService, workers: list[AnyWorker]) -> None:
        self._jobs = jobs
        self.workers = workers
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle: dict[int, list[threading.Event]] = {id(w): [] for w in workers}
        self._taken: set[str] = set()  # job ids a slot of this process is claiming or running
        # An idle slot woken for a new job: that job's id, which it claims without reading the queue first (it
        # was idle, so nothing else queued was waiting for it; the fair order decides among jobs that wait).
        self._hints: dict[threading.Event, str | Job] = {}
        # Per worker: jobs announced while all its slots were busy; a slot that finishes a job looks again
        # only while this is above zero (otherwise nothing new can be queued for it: it would find nothing).
        self._backlog: dict[int, int] = dict.fromkeys(self._idle, 0)
        # Jobs a create wrote claimed by a worker here (free_worker) that found no idle slot when handed over
        # (another job took it meanwhile): its next slot to finish runs them before reading the queue.
        self._kept: dict[int, deque[Job]] = {id(w): deque() for w in workers}
        self._by_id = {w.worker_id: w for w in workers}

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
        targets: list[tuple[Any, tuple[Any, ...]]] = [(self._serve, (w,)) for w in self.workers]
        if self.workers:  # an API node without workers has no leases to sweep here
            targets.append((self._maintain, ()))
        for target, args in targets:
            thread = threading.Thread(target=target, args=args, name="fluxserve-worker", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self, job: Job | None = None) -> None:
        """One idle slot of one worker that can run ``job`` looks now; without a job, one slot of each worker.
        Where every such slot is busy, the next of them to finish a job looks again (the worker's backlog)."""
        if job is None:
            for worker in self.workers:
                self._wake_one([worker], [worker])
            return
        if job.status is not Status.QUEUED:  # its create claimed it for a slot here (hand): none is woken for it
            return
        able = [w for w in self.workers if w.route == job.route and job.spec.model in w.models()]
        if not able:
            self.wake()  # no worker names its model: whoever can say so (fails it with a clear error) looks
            return
        warm = [w for w in able if job.spec.model in w.loaded_models()]
        self._wake_one([*warm, *able], able, job.id)

    def free_worker(self, job: Job) -> str | None:
        """A worker here that takes jobs claimed by their create (jobs.Taker) and has an idle slot for this one
        now: the job was not queued behind anything of that worker's (its slot would be busy otherwise)."""
        if self._stopping.is_set():
            return None
        with self._lock:
            for w in self.workers:
                able = w.takes_claimed and w.route == job.route and w.state == "ready" and not w.sleeping
                if able and self._idle[id(w)] and job.spec.model in w.models():
                    return str(w.worker_id)
        return None

    def hand(self, job: Job) -> None:
        """The job its create claimed for one of these workers (free_worker), committed: to an idle slot of it,
        or to the next of its slots to finish one."""
        worker = self._by_id[job.worker_id]
        self._wake_one([worker], [worker], job)

    def _wake_one(self, order: list[AnyWorker], able: list[AnyWorker], hint: str | Job | None = None) -> None:
        """``hint``: the job to run, by id (claimed by the slot) or claimed already (hand)."""
        with self._lock:  # one section: a slot going idle sees either its wake-up or the backlog, never neither
            if isinstance(hint, Job) and self._stopping.is_set():
                event, give_back = None, hint  # no slot will start it: stop() has given back what it found
            else:
                event, give_back = next((self._idle[id(w)].pop() for w in order if self._idle[id(w)]), None), None
                if event is None:
                    for w in able:
                        self._backlog[id(w)] += 1
                    if isinstance(hint, Job):
                        self._kept[id(order[0])].append(hint)
                elif hint is not None:
                    self._hints[event] = hint
        if event is not None:
            event.set()
        if give_back is not None:
            self._give_back([give_back])

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        for w in self.workers:
            w.begin_stop()
        with self._lock:
            events = [e for idle in self._idle.values() for e in idle]
        for event in events:
            event.set()
        for thread in self._threads:
            thread.join(timeout)
        with self._lock:  # jobs claimed by their create that no slot started
            left = [j for kept in self._kept.values() for j in kept]
            left += [h for h in self._hints.values() if isinstance(h, Job)]
            self._hints.clear()
            for kept in self._kept.values():
                kept.clear()
        self._give_back(left)
        for w in self.workers:
            w.stop(timeout)

    def _give_back(self, jobs: list[Job]) -> None:
        """Claimed jobs this process will not run, back to the queue with their attempt (a clean stop)."""
        for job in jobs:
            try:
                self._jobs.requeue(job, "shutdown", give_back_attempt=True)
            except StoreUnavailable as exc:  # its lease runs out: the sweep re-queues it then
                log.warning("job %s: not given back at stop: %s", job.id, exc.message)

    def loaded_models(self) -> list[str]:
        return sorted({m for w in self.workers for m in w.loaded_models()})

    def local_workers(self) -> list[AnyWorker]:
        return list(self.workers)

    def engine_info(self) -> dict[str, Any]:
        infos = [w.engine_info() | {"state": w.state} for w in self.workers]
        return infos[0] if len(infos) == 1 else {"workers": infos}

    # -- the maintenance thread and a worker's slots ------------------------------------

    def _maintain(self) -> None:
        last_sweep = time.monotonic()
        while not self._stopping.wait(MAINTENANCE_S):
            try:
                self._jobs.expire()
                self._jobs.spill()
            except StoreUnavailable as exc:
                log.warning("queue maintenance: %s", exc.message)
            except Exception:  # the sweep must outlive anything the store throws
                log.exception("queue maintenance error")
            if time.monotonic() - last_sweep >= SWEEP_S:
                last_sweep = time.monotonic()
                self.wake()

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

    def _listed(self, worker: AnyWorker, event: threading.Event, *, listed: bool) -> bool:
        """List this slot as idle (its event cleared) or take it off the list; whether a wake-up had chosen it
        since it was last listed (its event set)."""
        with self._lock:
            idle = self._idle[id(worker)]
            chosen = event.is_set()
            event.clear()
            if event in idle:
                idle.remove(event)
            if listed and not self._stopping.is_set():
                idle.append(event)
        return chosen

    def _loop(self, worker: AnyWorker) -> None:
        event = threading.Event()
        backoff = 0.25
        while not self._stopping.is_set():
            self._listed(worker, event, listed=True)
            try:
                ran = self._run_next(worker, event)
            except StoreUnavailable as exc:
                worker.degrade(exc.message)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, STORE_RETRY_MAX_S)
                continue
            except Exception:  # the loop must outlive anything a job or the store throws
                log.exception("worker loop error")
                self._stopping.wait(1.0)
                continue
            worker.recovered()
            backoff = 0.25
            if ran and self._behind(worker, event):
                continue  # a job was announced while this slot ran one: look again
            if not self._stopping.is_set():  # set: stop() may have missed this slot (listed too late)
                event.wait()  # a wake-up, the maintenance sweep's, or stop
        self._listed(worker, event, listed=False)

    def _behind(self, worker: AnyWorker, event: threading.Event) -> bool:
        """After a job: True (and one less owed) when a job was announced while every slot of this worker was
        busy; else the slot is listed idle, with no look (nothing new was queued for it: it would find none)."""
        with self._lock:
            if self._stopping.is_set():
                return True  # the loop ends at its top
            if self._backlog[id(worker)] > 0:
                self._backlog[id(worker)] -= 1
                return True
            event.clear()
            self._idle[id(worker)].append(event)
        return False

    def _others_healthy(self, worker: AnyWorker) -> bool:
        """Another worker that can take this one's jobs (the same route: devices, or the same upstream)."""
        live = ("loading", "ready")
        return any(o.state in live for o in self.workers if o is not worker and o.route == worker.route)

    def _run_next(self, worker: AnyWorker, event: threading.Event) -> bool:
        """Run the first queued job this worker can claim; whether one ran. The slot leaves the idle list
        while it runs one, handing on a wake-up that chose it meanwhile (that job may not be the one it took)."""
        with self._lock:  # its wake-up's job first; else one handed over while every slot was busy (the backlog)
            hint = self._hints.pop(event, None)
            kept = self._kept[id(worker)]
            if hint is None and kept:
                hint = kept.popleft()
        if isinstance(hint, Job):  # claimed already: runs whatever the worker's state (its run fails it over)
            return self._run_first(worker, event, [hint.id], hint)
        if worker.state == "error" and self._others_healthy(worker):
            return False
        if worker.sleeping:
            return False  # POST /sleep: jobs stay queued until /wake_up
        if hint is not None and self._run_first(worker, event, [hint]):
            return True  # the job its wake-up named (a read of the queue fewer on each job's way in)
        queued = self._jobs.store.queued(limit=CANDIDATES, models=worker.models(), route=worker.route)
        return self._run_first(
            worker, event, warm_first(queued, worker.loaded_models(), worker.max_model_wait_s, time.time())
        )

    def _run_first(
        self, worker: AnyWorker, event: threading.Event, job_ids: list[str], claimed: Job | None = None
    ) -> bool:
        """Claim and run the first of these that is still queued; whether one ran. ``claimed``: the one job,
        claimed by its create (hand), is run as it is."""
        for job_id in job_ids:
            if self._stopping.is_set() and claimed is None:
                return False
            with self._lock:  # another slot here is claiming it: never two claims of one job from this process
                if job_id in self._taken:
                    continue
                self._taken.add(job_id)
            try:
                if self._listed(worker, event, listed=False):  # hand that wake-up on to another slot
                    with self._lock:
                        handed = self._hints.pop(event, None)
                    self._wake_one([worker], [worker], handed)
                if claimed is not None:
                    worker.run_held(claimed)
                    return True
                if worker.run_claimed(job_id):
                    return True
            finally:
                with self._lock:
                    self._taken.discard(job_id)
            self._listed(worker, event, listed=True)
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
