"""JobService: the only writer of job state, and the one place that waits on it.

Workers call the transitions (claim, progress, preview, complete, fail, cancel, requeue, expire)
from their threads; each is fenced by status, attempt and worker id and recorded as a job event in
the same transaction (store.py). Dialects call the ``async`` methods, which run the store off the
event loop. Watchers read the events table, so a worker in another process is seen the same way;
inside one process a transition also wakes the watchers at once instead of at their next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from .errors import Conflict, NotFound, PaymentRequired
from .job import EventKind, Job, JobEvent, Output, Status, new_job_id
from .limits import Limits, admit
from .limits import note as note_rate_headers
from .logs import job_fields, job_line
from .models import ModelRegistry
from .offload import Offload
from .readout import note as note_read
from .spec import GenerationSpec
from .store import (
    DuplicateJob,
    Fence,
    Store,
    fairness,
    insert_row,
    key_limits,
    outputs_json,
    record_usage,
    serialize_owner,
    usage,
)
from .store.credits import hold
from .store.events import append_event
from .waiters import Waiters

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a watcher looks for events written by other processes


class Taker(Protocol):
    """Where a new job can start at once (queue.local.LocalDispatcher): a worker of this process with an idle
    slot for it. Its create then writes it claimed by that worker, in the same transaction (no claim of its own
    after it), and hands it over once committed."""

    def free_worker(self, job: Job) -> str | None: ...
    def hand(self, job: Job) -> None: ...


class JobService:
    def __init__(
        self,
        store: Store,
        *,
        max_attempts: int = 2,
        lease_s: float = 20.0,
        threads: int = 4,
        limits: Limits | None = None,
        registry: ModelRegistry | None = None,
        licensed: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.licensed = dict(licensed or {})  # model name -> BFL licence slug: its generations are reported
        # Where each name's jobs run (its upstream, if any) and what they cost; None: all local, free.
        self.registry = registry
        self.limits = limits  # the server's per-key defaults; keys may override them
        self.max_attempts = max_attempts
        self.lease_s = lease_s
        # Store calls from request handlers run on these pools, never on the event loop (offload.py).
        self.offload = Offload(store_threads=threads)
        self.run, self.run_auth, self.run_slow = self.offload.run, self.offload.run_auth, self.offload.run_slow
        self.run_dns = self.offload.run_dns
        self._waiters = Waiters()
        self._on_change: list[Callable[[Job, EventKind], None]] = []
        self._taker: Taker | None = None

    def take_at_create(self, taker: Taker) -> None:
        """New jobs that a worker here can start at once are claimed by their create (the embedded queue)."""
        self._taker = taker

    def close(self) -> None:
        self.offload.close()

    def on_change(self, callback: Callable[[Job, EventKind], None]) -> None:
        """A local shortcut (webhook sender, worker wake-up); the events table stays the truth."""
        self._on_change.append(callback)

    # -- transitions --------------------------------------------------------

    def _changed(self, job: Job | None, kind: EventKind) -> Job | None:
        if job is None:
            return None
        final = job.status.is_terminal
        self._waiters.wake(job.id, final=final, ended=job if final else None)  # first: a synchronous call answers
        if kind is not EventKind.PROGRESS and kind is not EventKind.PREVIEW:  # one line per transition, not step
            log.info("job %s %s model=%s attempt=%d", *job_line(job, kind), extra=job_fields(job, kind))
        for callback in self._on_change:
            try:
                callback(job, kind)
            except Exception:
                log.exception("job change callback failed")
        return job

    def wake(self, job_id: str, *, final: bool = True) -> None:
        """Watchers of this job look now; called on each change here (``final``: it ended) and on each NOTIFY
        from another node (any change: final, so every watcher looks)."""
        self._waiters.wake(job_id, final=final)

    def nudges(self, job_id: str) -> contextlib.AbstractContextManager[threading.Event]:
        """A thread's wake-up for this job (an upstream's webhook came): set on every wake."""
        return self._waiters.waiting_thread(job_id)

    def submit_sync(self, *args: Any, **kwargs: Any) -> Job:
        return self._submit(*args, **kwargs)[0]

    def _submit(
        self,
        owner: str,
        dialect: str,
        spec: GenerationSpec,
        request: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        input_digest: str | None = None,
        with_position: bool = False,
        **fields: Any,
    ) -> tuple[Job, dict[str, str]]:
        """Queue a job. The same Idempotency-Key with the same request (and input images, by digest)
        returns the first job; another is a 409. ``fields``: the Job's own (deadline, webhook, retain_s,
        batch_id). ``with_position``: its queue position read in the same transaction (no second read)."""
        fingerprint = None
        if idempotency_key is not None:
            signed = [dialect, request, *([input_digest] if input_digest else [])]
            fingerprint = hashlib.sha256(json.dumps(signed, sort_keys=True).encode()).hexdigest()
            existing = self.store.find_idempotent(owner, idempotency_key)
            if existing is not None:
                return self._replay(existing, fingerprint), {}
        model = self.registry.get(spec.model) if self.registry is not None and spec.model in self.registry else None
        job = Job(
            id=new_job_id(),
            owner=owner,
            dialect=dialect,
            spec=spec,
            request=request,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
            progress_total=spec.steps,
            route=(model.upstream or None) if model is not None else None,
            cost=self.registry.cost(spec) if model is not None and self.registry is not None else None,
            **fields,
        )
        taker = self._taker.free_worker(job) if self._taker is not None else None
        metered = self.limits is not None or job.cost is not None
        inserted = self._insert(job, metered=metered, position=with_position, taker=taker)
        if inserted is None:  # a concurrent request with the same key won the insert
            existing = self.store.find_idempotent(owner, idempotency_key or "")
            assert existing is not None
            return self._replay(existing, fingerprint), {}
        headers, position, started = inserted
        job = replace(job, queue_position=position)
        if started is None:
            self._changed(job, EventKind.SUBMITTED)
            return job, headers
        assert self._taker is not None
        # Handed over first: its slot sends it upstream while this thread logs and wakes watchers (a processing
        # job wakes no worker). The answer shows it queued, as it was an instant before its claim.
        self._taker.hand(started)
        self._changed(started, EventKind.SUBMITTED)
        self._changed(started, EventKind.STARTED)
        return job, headers

    def _insert(
        self, job: Job, *, metered: bool, position: bool, taker: str | None = None
    ) -> tuple[dict[str, str], int | None, Job | None] | None:
        """The create, in one transaction: admission (limits, credits) -> fair priority -> the row -> its
        submitted event -> its queue entry, so all of them commit or none does. Returns the admission's
        rate-limit headers, asked for, its queue position, and with a ``taker`` (a worker id) the job as
        that worker's claim wrote it; None when a concurrent create with the same idempotency key won."""
        try:
            with self.store.transaction() as conn:
                headers: dict[str, str] = {}
                if metered:  # credits (PaymentRequired), then limits (RateLimited), one key at a time
                    serialize_owner(conn, job.owner)
                    job = replace(job, cost=hold(conn, job))  # the row records what was held, not the price
                    effective = self.limits.over(key_limits(conn, job.owner)) if self.limits else None
                    if effective is not None and effective.any:
                        now = job.created_at
                        headers = admit(effective, usage(conn, job.owner, now), job.spec.num_images, now)
                priority = fairness.priority(conn, job.owner, batch=job.batch_id is not None)
                rules = self.store.webhook_rules
                if taker is not None:  # written claimed: the claim's values (store.claim), the same two events
                    started = self._claimed(job, taker)
                    insert_row(conn, started, priority, {})
                    append_event(conn, job, EventKind.SUBMITTED, {}, rules)
                    append_event(conn, started, EventKind.STARTED, {"worker": taker}, rules)
                    return headers, 1 if position else None, started  # it was first in line
                queued = self.store.queue.deferred(conn, job, priority)  # the entry first: the row records it
                insert_row(conn, job, priority, queued)
                append_event(conn, job, EventKind.SUBMITTED, {}, rules)
                place = self.store.queue.position(conn, job.id) if position else None
        except DuplicateJob:
            return None
        return headers, place, None

    def _claimed(self, job: Job, worker_id: str) -> Job:
        now = time.time()  # the embedded queue's (SQLite's) clock: this machine's
        lease = now + self.lease_s
        return replace(
            job, status=Status.PROCESSING, attempts=1, started_at=now, worker_id=worker_id, lease_expires_at=lease
        )

    @staticmethod
    def _replay(existing: Job, fingerprint: str | None) -> Job:
        if existing.fingerprint != fingerprint:
            raise Conflict(
                "This Idempotency-Key was already used with a different request body.", param="Idempotency-Key"
            )
        return existing

    def claim(self, worker_id: str, models: set[str] | None = None) -> Job | None:
        """The next queued job this worker serves (keys take turns), now processing under its lease."""
        ids = [job_id for job_id, *_ in self.store.queued(limit=16, models=models)]
        claimed = self.store.claim(ids, worker_id, self.lease_s, first_only=True) if ids else []
        for job in claimed:
            self._changed(job, EventKind.STARTED)
        return claimed[0] if claimed else None

    def claim_id(self, job_id: str, worker_id: str) -> Job | None:
        """This queued job (its queue entry was fetched), now processing under this worker's lease."""
        claimed = self.store.claim([job_id], worker_id, self.lease_s, first_only=True)
        for job in claimed:
            self._changed(job, EventKind.STARTED)
        return claimed[0] if claimed else None

    def claim_compatible(
        self, first: Job, worker_id: str, max_images: int, lock: Callable[[Any, list[str]], list[str]] | None = None
    ) -> list[Job]:
        """Queued jobs that can share ``first``'s pipeline call, in fair order, up to max_images in all."""
        key = first.spec.batch_key()
        budget = max_images - first.spec.num_images
        ids: list[str] = []
        for job_id, _, spec, _ in self.store.queued(limit=64, models=[first.spec.model]):
            if budget <= 0:
                break
            if spec.batch_key() == key and spec.num_images <= budget:
                budget -= spec.num_images
                ids.append(job_id)
        claimed = self.store.claim(ids, worker_id, self.lease_s, first_only=False, lock=lock) if ids else []
        for job in claimed:
            self._changed(job, EventKind.STARTED)
        return claimed

    def _fenced(
        self,
        job: Job,
        kind: EventKind,
        values: Any,
        payload: dict[str, Any] | None = None,
        lease_before: float | None = None,
        price: Callable[[Job], float | None] | None = None,
        then: Callable[[Any, Job], None] | None = None,
        uncanceled: bool = False,
    ) -> Job | None:
        return self._changed(
            self.store.transition(
                job.id,
                kind,
                expect=[Status.PROCESSING],
                values=values,
                attempt=job.attempts,
                worker_id=job.worker_id,
                price=price,
                payload=payload,
                lease_before=lease_before,
                then=then,
                uncanceled=uncanceled,
            ),
            kind,
        )

    def progress(self, batch: list[Job], done: int, total: int, note: str | None = None) -> list[Job | None]:
        """Step ``done`` of ``total`` for each job of a batch, in one transaction; with a ``note``, what the
        batch waits for before its first step instead (its model loading). A job comes back as it is now (its
        ``cancel_requested`` is fresh), or None where this claim is no longer the job's (lease lost)."""
        fences = [Fence(j.id, j.attempts, j.worker_id) for j in batch]
        values: dict[str, Any] = {"progress_done": done, "progress_total": total}
        payload: dict[str, Any] = {"step": done, "total": total}
        if note is not None:
            values, payload = {"note": note[:300]}, {"note": note}
        now = self.store.transition_many(
            fences, EventKind.PROGRESS, expect=[Status.PROCESSING], values=values, payload=payload
        )
        for job in now:
            self._changed(job, EventKind.PROGRESS)
        return now

    def queued_models(self, models: list[str]) -> set[str]:
        """Which of these names queued jobs wait for (idle unload spares them)."""
        return {model for _, model, *_ in self.store.queued(limit=256, models=models, route=None)}

    def add_preview(self, job: Job, key: str) -> bool:
        def values(current: Job) -> dict[str, Any]:
            return {"previews": json.dumps([*current.previews, key])}

        return self._fenced(job, EventKind.PREVIEW, values, {"key": key}) is not None

    def complete(
        self, job: Job, outputs: list[Output], *, encode_s: float | None = None, mark: str | None = None
    ) -> bool:
        """``encode_s``: the time spent encoding and storing its images (the metrics' encoding stage); ``mark``:
        the watermark its images carry (provenance), by which a check finds the job.

        A job whose cancel was accepted meanwhile ends canceled: clients were told so when they asked. The
        success is written only while no cancel is asked (one statement, no read before it); refused, the
        flag is read to tell a cancel from a lost claim."""
        values = {
            "status": Status.SUCCEEDED.value,
            "completed_at": time.time(),
            "outputs": outputs_json(outputs),
            "encode_s": encode_s,
        }
        if mark is not None:
            values["mark"] = mark
        slug = self.licensed.get(job.spec.model) if job.route is None else None  # our own weights only
        now = time.time()

        def count(conn: Any, done: Job) -> None:  # BFL licence usage, written with the success (licensing.py)
            record_usage(conn, done.id, slug or "", len(outputs), now)

        payload = {"outputs": [o.key for o in outputs]}
        then = count if slug else None
        if self._fenced(job, EventKind.SUCCEEDED, values, payload, then=then, uncanceled=True) is not None:
            return True
        return self.store.is_cancel_requested(job.id) and self.finish_canceled(job)

    def fail(self, job: Job, error: str, *, lease_before: float | None = None, code: str | None = None) -> bool:
        values = {"status": Status.FAILED.value, "completed_at": time.time(), "error": error, "error_code": code}
        return self._fenced(job, EventKind.FAILED, values, {"error": error}, lease_before) is not None

    def finish_canceled(self, job: Job) -> bool:
        values = {"status": Status.CANCELED.value, "completed_at": time.time(), "error": "canceled"}
        return self._fenced(job, EventKind.CANCELED, values) is not None

    def requeue(self, job: Job, reason: str, *, give_back_attempt: bool, lease_before: float | None = None) -> bool:
        """Back to the queue: a clean shutdown gives the attempt back, a lost worker does not."""
        values: dict[str, Any] = {
            "status": Status.QUEUED.value,
            "progress_done": 0,
            "previews": "[]",
            "worker_id": None,
            "lease_expires_at": None,
        }
        if give_back_attempt:
            values["attempts"] = job.attempts - 1
        return self._fenced(job, EventKind.REQUEUED, values, {"reason": reason}, lease_before) is not None

    def note_upstream(self, job: Job, payload: dict[str, Any]) -> bool:
        """An upstream task's step as a job event (fenced: only the attempt holding the job writes it)."""
        return self._fenced(job, EventKind.UPSTREAM, {"worker_id": job.worker_id}, payload) is not None

    def reroute(self, job: Job, upstream: str | None, reason: str) -> bool:
        """Failover: back to the queue on another upstream (None: a local device, where a spilled job came
        from), the attempt given back (it was not the job's fault)."""
        values: dict[str, Any] = {
            "status": Status.QUEUED.value,
            "route": upstream,
            "progress_done": 0,
            "worker_id": None,
            "lease_expires_at": None,
            "attempts": job.attempts - 1,
        }
        payload = {"from": job.route, "to": upstream, "reason": reason}
        return self._fenced(job, EventKind.ROUTED, values, payload, price=self._price_on(upstream)) is not None

    def _price_on(self, route: str | None) -> Callable[[Job], float | None]:
        """What a job costs where it goes (PaymentRequired from the move when its key cannot pay)."""
        return lambda job: self.registry.cost(job.spec, route=route) if self.registry is not None else None

    def events(self, job_id: str) -> list[JobEvent]:
        return self.store.events(job_id)

    def spill(self, now: float | None = None) -> int:
        """Local jobs no local worker started within their model's spill_after_s go to its spill_to upstream
        (store.spillable: those it can honour). Each move is a fenced transition (still queued, still local):
        the job runs once, here or there, and costs the upstream's price."""
        now, moved = time.time() if now is None else now, 0
        for model in self.registry or []:
            if not (model.spill_to and model.is_local):
                continue
            for job_id in self.store.spillable(model.name, now - model.spill_after_s):
                try:
                    job = self.store.transition(
                        job_id,
                        EventKind.ROUTED,
                        expect=[Status.QUEUED],
                        values={"route": model.spill_to},
                        payload={"from": None, "to": model.spill_to, "reason": "spill"},
                        route=None,
                        price=self._price_on(model.spill_to),
                    )
                except PaymentRequired:
                    continue  # the key cannot pay the upstream's price: it waits for a local worker
                moved += self._changed(job, EventKind.ROUTED) is not None
        return moved

    def renew(self, jobs: list[Job], worker_id: str) -> set[str]:
        """Extend this worker's leases; returns the ids it still holds."""
        return self.store.renew([(j.id, j.attempts) for j in jobs], worker_id, self.lease_s)

    def is_cancel_requested(self, job_id: str) -> bool:
        return self.store.is_cancel_requested(job_id)

    def expire(self, now: float | None = None) -> tuple[int, int, int]:
        """Abort queued jobs past their Cancel-After deadline; re-queue (or fail, past max_attempts)
        jobs whose worker's lease ran out. Returns (aborted, requeued, failed)."""
        now = self.store.now() if now is None else now  # the database clock on PostgreSQL
        aborted = requeued = failed = 0
        for job in self.store.past_deadline(now):
            done = self.store.transition(
                job.id,
                EventKind.ABORTED,
                expect=[Status.QUEUED],
                values={
                    "status": Status.ABORTED.value,
                    "completed_at": now,
                    "error": "The job's deadline (Cancel-After, X-Fal-Request-Timeout) passed before it started.",
                },
            )
            aborted += self._changed(done, EventKind.ABORTED) is not None
        for job in self.store.expired_leases(now):
            if job.attempts >= self.max_attempts:
                error = f"The worker running this job stopped, {job.attempts} times; giving up."
                failed += self.fail(job, error, lease_before=now)
                log.warning("job %s failed: %s", job.id, error)
            else:
                requeued += self.requeue(job, "lease expired", give_back_attempt=False, lease_before=now)
                log.warning("job %s re-queued: its worker %s stopped renewing its lease", job.id, job.worker_id)
        return aborted, requeued, failed

    # -- reads and requests from the dialects -------------------------------

    def get_sync(self, job_id: str, owner: str, dialect: str | None = None) -> Job:
        """Another owner's job, or another dialect's when one is named, is indistinguishable from a missing one."""
        job = self.store.get_job(job_id, with_position=True)
        if job is None or not secrets.compare_digest(job.owner, owner) or dialect not in (None, job.dialect):
            raise NotFound(f"No job with id {job_id!r}.", param="id")
        return job

    def cancel_sync(self, job_id: str, owner: str, dialect: str | None = None) -> Job:
        self.get_sync(job_id, owner, dialect)
        kind = EventKind.CANCEL_REQUESTED
        changed = self.store.request_cancel(job_id)
        if changed is not None and changed.status is Status.CANCELED:
            kind = EventKind.CANCELED
        self._changed(changed, kind)
        return self.get_sync(job_id, owner, dialect)

    def cancel_soon(self, job_id: str, owner: str) -> None:
        """Cancel without waiting: for code being torn down (a stream whose client left) that cannot await."""

        def cancel() -> None:
            try:
                self.cancel_sync(job_id, owner)
            except Exception:
                log.exception("canceling job %s failed", job_id)

        self.offload.submit(cancel)

    async def submit(self, *args: Any, **kwargs: Any) -> Job:
        """submit_sync off the loop; an admitted create's x-ratelimit-* headers go to the response."""

        job, headers = await self.run(self._submit, *args, **kwargs)
        note_rate_headers(headers)
        return job

    async def get(self, job_id: str, owner: str, dialect: str | None = None) -> Job:
        """The job as it is now, noted as the one the request's answer is about (readout: its headers)."""
        return note_read(await self.run(self.get_sync, job_id, owner, dialect))

    async def find(self, job_id: str) -> Job | None:
        """Any owner's job: for a request whose signed URL already proves it may see it."""
        return await self.run(self.store.get_job, job_id)

    async def cancel(self, job_id: str, owner: str, dialect: str | None = None) -> Job:
        return await self.run(self.cancel_sync, job_id, owner, dialect)

    async def list(self, owner: str, dialect: str, *, before: tuple[float, str] | None, limit: int) -> list[Job]:
        return await self.run(self.store.list_jobs, owner, dialect, before=before, limit=limit)

    async def queue_depth(self) -> int:
        return await self.run(self.store.queue_depth)

    async def watch(self, job_id: str, owner: str, timeout: float | None = None) -> AsyncIterator[Job]:
        """Yield the job now and after every change, until it is terminal or ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        last_event = -1
        with self._waiters.waiting(job_id) as wake:
            while True:
                wake.clear()
                seen = await self.run(self.store.last_event_id, job_id)
                if seen != last_event:
                    last_event = seen
                    job = await self.get(job_id, owner)
                    yield job
                    if job.status.is_terminal:
                        return
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL_S if remaining is None else min(POLL_S, remaining))

    async def wait(self, job_id: str, owner: str, timeout: float | None = None, *, seen: Job | None = None) -> Job:
        """Wait until the job is terminal (or ``timeout`` passes) and return it as it is then. Woken only when
        it may have ended, not on each step (a synchronous call has nothing to say in between). ``seen``: the
        job as the caller last read it (its create's answer): not read again before a wake-up or the next
        poll (one store read fewer per synchronous call; an end just before this wait still wakes it)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        with self._waiters.waiting(job_id, final_only=True) as wake:
            while True:
                if seen is not None and not seen.status.is_terminal and not wake.is_set():
                    job, seen = seen, None
                elif wake.ended is not None and secrets.compare_digest(wake.ended.owner, owner):
                    job = note_read(wake.ended)  # its end as written here: no read of the row just written
                else:
                    wake.clear()
                    job = await self.get(job_id, owner)
                remaining = None if deadline is None else deadline - loop.time()
                if job.status.is_terminal or (remaining is not None and remaining <= 0):
                    return job
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL_S if remaining is None else min(POLL_S, remaining))
