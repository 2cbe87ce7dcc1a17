"""In-process wake-ups of the coroutines watching a job: set on each change made here and on each NOTIFY
from another node, so a watcher looks at the events table now rather than at its next poll."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class Waiters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_job: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._threads: dict[str, list[threading.Event]] = {}

    def wake(self, job_id: str) -> None:
        """From any thread: every watcher of this job looks now."""
        with self._lock:
            waiters = list(self._by_job.get(job_id, []))
            threads = list(self._threads.get(job_id, []))
        for loop, ev in waiters:
            with contextlib.suppress(RuntimeError):  # that watcher's loop has closed
                loop.call_soon_threadsafe(ev.set)
        for event in threads:
            event.set()

    @contextlib.contextmanager
    def waiting_thread(self, job_id: str) -> Iterator[threading.Event]:
        """A thread's event set on each wake of this job (an upstream worker waiting between polls)."""
        event = threading.Event()
        with self._lock:
            self._threads.setdefault(job_id, []).append(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._threads.get(job_id, [])
                if event in events:
                    events.remove(event)
                if not events:
                    self._threads.pop(job_id, None)

    @contextlib.contextmanager
    def waiting(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set on each wake of this job, for as long as the caller watches it (on its own loop)."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._by_job.setdefault(job_id, []).append(waiter)
        try:
            yield waiter[1]
        finally:
            with self._lock:
                waiters = self._by_job.get(job_id, [])
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    self._by_job.pop(job_id, None)
