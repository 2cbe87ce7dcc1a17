"""In-process wake-ups of the coroutines watching a job: set on each change made here and on each NOTIFY
from another node, so a watcher looks at the events table now rather than at its next poll."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
# Jobs that ended while nobody here watched them, remembered so that a watcher registering just after (a
# synchronous call that has not yet looked since its create) looks at once instead of at its next poll.
ENDED_KEPT = 4096


class Watch(asyncio.Event):
    """A watcher's wake-up; ``ended``: the job as its end was written here, when the waker had it (a
    synchronous call answers from it instead of reading the row it was just told about)."""

    ended: Any = None

    def end(self, ended: Any) -> None:
        if ended is not None:
            self.ended = ended
        self.set()


class Waiters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_job: dict[str, list[tuple[asyncio.AbstractEventLoop, Watch, bool]]] = {}
        self._threads: dict[str, list[threading.Event]] = {}
        self._ended: OrderedDict[str, bool] = OrderedDict()

    def wake(self, job_id: str, *, final: bool = True, ended: Any = None) -> None:
        """From any thread: every watcher of this job looks now; ``final`` False (a step, a start): only those
        that follow each change, not those waiting for the end (waking a loop is a syscall and a re-read).
        ``ended``: the ended job as written, handed to the watchers (None: they read it)."""
        with self._lock:
            waiters = list(self._by_job.get(job_id, []))
            threads = list(self._threads.get(job_id, []))
            if final and not waiters and not threads:
                self._ended[job_id] = True
                if len(self._ended) > ENDED_KEPT:
                    self._ended.popitem(last=False)
        for loop, ev, final_only in waiters:
            if final_only and not final:
                continue
            with contextlib.suppress(RuntimeError):  # that watcher's loop has closed
                loop.call_soon_threadsafe(ev.end, ended)
        for event in threads:
            event.set()

    def waiting_thread(self, job_id: str) -> contextlib.AbstractContextManager[threading.Event]:
        """A thread's event set on each wake of this job (an upstream worker waiting between polls)."""
        event = threading.Event()
        return self._registered(self._threads, job_id, event, event)

    def waiting(self, job_id: str, *, final_only: bool = False) -> contextlib.AbstractContextManager[Watch]:
        """An event set on each wake of this job (``final_only``: only when it may have ended), for as long as
        the caller watches it (on its own loop)."""
        waiter = (asyncio.get_running_loop(), Watch(), final_only)
        return self._registered(self._by_job, job_id, waiter, waiter[1], missed=waiter[1].set)

    @contextlib.contextmanager
    def _registered(
        self,
        registry: dict[str, list[Any]],
        job_id: str,
        entry: Any,
        given: T,
        missed: Callable[[], None] | None = None,
    ) -> Iterator[T]:
        """``entry`` listed under the job while the caller holds ``given``; unlisted after, the job's list too.
        ``missed``: called at once when the job ended before this listing (in the same lock section: never
        both missed and unannounced)."""
        with self._lock:
            registry.setdefault(job_id, []).append(entry)
            ended = missed is not None and self._ended.pop(job_id, False)
        if ended and missed is not None:
            missed()
        try:
            yield given
        finally:
            with self._lock:
                entries = registry.get(job_id, [])
                if entry in entries:
                    entries.remove(entry)
                if not entries:
                    registry.pop(job_id, None)
