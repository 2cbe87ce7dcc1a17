"""Job and Status: the one truth about every request, and JobService, which decides."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .errors import NotFound
from .spec import GenerationSpec

if TYPE_CHECKING:
    from .store import Store

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

    @property
    def is_terminal(self) -> bool:
        return self in (Status.SUCCEEDED, Status.FAILED, Status.CANCELED)

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


class JobService:
    """Submit, read and wait on jobs. Dialects call this; the dispatcher runs the jobs."""

    def __init__(self, store: Store, wake_worker: Callable[[], None]) -> None:
        self._store = store
        self._wake_worker = wake_worker
        self._lock = threading.Lock()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def submit(self, owner: str, dialect: str, spec: GenerationSpec, request: dict[str, Any]) -> Job:
        job = Job(id=new_job_id(), owner=owner, dialect=dialect, spec=spec, request=request)
        self._store.insert_job(job)
        self._wake_worker()
        return job

    def get(self, job_id: str, owner: str) -> Job:
        """Another owner's job is indistinguishable from a missing one."""
        job = self._store.get_job(job_id)
        if job is None or not secrets.compare_digest(job.owner, owner):
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

    async def wait(self, job_id: str, owner: str, timeout: float | None = None) -> Job:
        """Wait until the job is terminal (or ``timeout`` passes) and return it."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._lock:
            self._waiters.setdefault(job_id, []).append((loop, event))
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                job = self.get(job_id, owner)
                if job.status.is_terminal:
                    return job
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return job
                event.clear()
                # The periodic re-read covers workers in other processes, which can't notify us.
                wait_s = 1.0 if remaining is None else min(1.0, remaining)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), wait_s)
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id, [])
                if (loop, event) in waiters:
                    waiters.remove((loop, event))
                if not waiters:
                    self._waiters.pop(job_id, None)

    def notify(self, job_id: str) -> None:
        """Called from any thread when a job changes."""
        with self._lock:
            waiters = list(self._waiters.get(job_id, []))
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def queue_depth(self) -> int:
        return self._store.queue_depth()
