"""Job and Status: the one truth about every request, and JobService, which decides."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from .errors import Conflict, NotFound
from .spec import GenerationSpec

if TYPE_CHECKING:
    from .store import Store

# What happened to a job: Replicate's webhook events, plus plain updates (progress without new logs).
JobEvent = Literal["start", "logs", "output", "completed", "update"]

# The events after which a job may be terminal: "completed" from the worker, "update" from a cancel.
_ENDING_EVENTS: frozenset[JobEvent] = frozenset({"completed", "update"})
_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Event, frozenset[JobEvent] | None]

_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def new_job_id() -> str:
    """26 random base32 characters (130 bits), the shape of the seed's ids."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(26))


class Status(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    ABORTED = "aborted"  # its Cancel-After deadline passed before it started

    @property
    def is_terminal(self) -> bool:
        return self in (Status.SUCCEEDED, Status.FAILED, Status.CANCELED, Status.ABORTED)

    @property
    def public(self) -> str:
        """The lifecycle name the seed and Replicate use (queued jobs are 'starting')."""
        return "starting" if self is Status.QUEUED else self.value


@dataclass(frozen=True)
class Output:
    key: str
    seed: int
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    dialect: str
    spec: GenerationSpec
    request: dict[str, Any]
    status: Status = Status.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    progress_done: int = 0
    progress_total: int = 0
    outputs: tuple[Output, ...] = ()
    error: str | None = None
    queue_position: int | None = None
    deadline: float | None = None
    webhook: dict[str, Any] | None = None  # {"url", "events", "secret"?}
    idempotency_key: str | None = None
    fingerprint: str | None = None
    previews: tuple[str, ...] = ()  # storage keys of in-progress previews, oldest first

    @property
    def progress(self) -> float:
        if self.status is Status.SUCCEEDED:
            return 1.0
        return self.progress_done / self.progress_total if self.progress_total else 0.0

    def log_lines(self) -> list[str]:
        """Progress as log lines, for dialects (Replicate) that report it as logs."""
        lines = [f"Using seed: {self.spec.seed}"]
        if self.started_at is not None:
            lines.append(f"Running {self.spec.model} at {self.spec.width}x{self.spec.height}, {self.spec.steps} steps")
        lines += [f"step {i}/{self.progress_total}" for i in range(1, self.progress_done + 1)]
        return lines


class JobService:
    """Submit, read and wait on jobs. Dialects call this; the dispatcher runs the jobs."""

    def __init__(self, store: Store, wake_worker: Callable[[], None]) -> None:
        self._store = store
        self._wake_worker = wake_worker
        self._lock = threading.Lock()
        self._waiters: dict[str, list[_Waiter]] = {}
        self._listeners: list[Callable[[str, JobEvent], None]] = []

    def submit(
        self,
        owner: str,
        dialect: str,
        spec: GenerationSpec,
        request: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        deadline: float | None = None,
        webhook: dict[str, Any] | None = None,
    ) -> Job:
        """Queue a job. The same Idempotency-Key with the same body returns the first job; a different body is a 409."""
        fingerprint = None
        if idempotency_key is not None:
            fingerprint = hashlib.sha256(json.dumps([dialect, request], sort_keys=True).encode()).hexdigest()
            existing = self._store.find_idempotent(owner, idempotency_key)
            if existing is not None:
                return self._replay(existing, fingerprint)
        job = Job(
            id=new_job_id(),
            owner=owner,
            dialect=dialect,
            spec=spec,
            request=request,
            deadline=deadline,
            webhook=webhook,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
        )
        if not self._store.insert_job(job):  # a concurrent request with the same key won the insert
            existing = self._store.find_idempotent(owner, idempotency_key or "")
            assert existing is not None
            return self._replay(existing, fingerprint)
        self._wake_worker()
        return job

    @staticmethod
    def _replay(existing: Job, fingerprint: str | None) -> Job:
        if existing.fingerprint != fingerprint:
            raise Conflict(
                "This Idempotency-Key was already used with a different request body.", param="Idempotency-Key"
            )
        return existing

    def get(self, job_id: str, owner: str, dialect: str | None = None) -> Job:
        """Another owner's job, or another dialect's when one is named, is indistinguishable from a missing one."""
        job = self._store.get_job(job_id)
        if job is None or not secrets.compare_digest(job.owner, owner) or dialect not in (None, job.dialect):
            raise NotFound(f"No job with id {job_id!r}.", param="id")
        if job.status is Status.QUEUED:
            job = replace(job, queue_position=self._store.queue_position(job))
        return job

    def cancel(self, job_id: str, owner: str) -> Job:
        self.get(job_id, owner)
        self._store.request_cancel(job_id)
        self.notify(job_id)
        return self.get(job_id, owner)

    def is_cancel_requested(self, job_id: str) -> bool:
        return self._store.is_cancel_requested(job_id)

    async def watch(
        self, job_id: str, owner: str, timeout: float | None = None, events: frozenset[JobEvent] | None = None
    ) -> AsyncIterator[Job]:
        """Yield the job now and after every change (of the kinds in ``events``; None: all), until it is
        terminal or ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waiter = (loop, event, events)
        with self._lock:
            self._waiters.setdefault(job_id, []).append(waiter)
        deadline = None if timeout is None else loop.time() + timeout
        last: tuple[object, ...] | None = None
        try:
            while True:
                event.clear()
                job = self.get(job_id, owner)
                state = (job.status, job.progress_done, job.previews, job.outputs, job.queue_position)
                if state != last:
                    last = state
                    yield job
                if job.status.is_terminal:
                    return
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                # The periodic re-read covers workers in other processes, which can't notify us.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), 1.0 if remaining is None else min(1.0, remaining))
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id, [])
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    self._waiters.pop(job_id, None)

    async def wait(self, job_id: str, owner: str, timeout: float | None = None) -> Job:
        """Wait until the job is terminal (or ``timeout`` passes) and return it as it is then."""
        last = self.get(job_id, owner)
        # Progress events would wake the waiter only to re-read a job that is not done yet.
        async for job in self.watch(job_id, owner, timeout, events=_ENDING_EVENTS):
            last = job
        return last

    def add_listener(self, listener: Callable[[str, JobEvent], None]) -> None:
        self._listeners.append(listener)

    def notify(self, job_id: str, event: JobEvent = "update") -> None:
        """Called from any thread when a job changes; listeners (webhooks) must not block."""
        with self._lock:
            waiters = list(self._waiters.get(job_id, []))
        for loop, ev, wanted in waiters:
            if wanted is None or event in wanted:
                loop.call_soon_threadsafe(ev.set)
        for listener in self._listeners:
            listener(job_id, event)

    def queue_depth(self) -> int:
        return self._store.queue_depth()
