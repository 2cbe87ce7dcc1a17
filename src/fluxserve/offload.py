"""The bounded thread pools that keep blocking work off the event loop, one per kind of work: store calls,
API key lookups, webhook DNS checks (with a deadline), and slow request work (image encoding, file reads and
writes), so a create whose webhook host resolves slowly never makes another tenant's GET or encode wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
DNS_DEADLINE_S = 5.0


class Offload:
    def __init__(
        self, store_threads: int = 4, auth_threads: int = 4, slow_threads: int = 8, dns_threads: int = 4
    ) -> None:
        self._store = ThreadPoolExecutor(max_workers=store_threads, thread_name_prefix="fluxserve-store")
        self._auth = ThreadPoolExecutor(max_workers=auth_threads, thread_name_prefix="fluxserve-auth")
        self._slow = ThreadPoolExecutor(max_workers=slow_threads, thread_name_prefix="fluxserve-io")
        self._dns = ThreadPoolExecutor(max_workers=dns_threads, thread_name_prefix="fluxserve-dns")

    def close(self) -> None:
        for pool in (self._store, self._auth, self._slow):
            pool.shutdown(wait=True)
        self._dns.shutdown(wait=False, cancel_futures=True)  # a resolver stuck on a dead server: not waited for

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Store work started from synchronous code, not awaited."""
        return self._store.submit(fn)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store call, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._store, lambda: fn(*args, **kwargs))

    async def run_auth(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """An API key lookup: its own threads, so authentication never queues behind other work."""
        return await asyncio.get_running_loop().run_in_executor(self._auth, lambda: fn(*args, **kwargs))

    async def run_dns(self, fn: Callable[..., T], *args: Any, deadline_s: float = DNS_DEADLINE_S, **kwargs: Any) -> T:
        """A webhook host's DNS check: its own threads, and TimeoutError past ``deadline_s`` (a resolver can
        take the system's whole timeout; the request answers before that, the thread finishes on its own)."""
        future = asyncio.get_running_loop().run_in_executor(self._dns, lambda: fn(*args, **kwargs))
        return await asyncio.wait_for(future, deadline_s)

    async def run_slow(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A request's slow blocking work (DNS lookups, image encoding, file reads and writes)."""
        return await asyncio.get_running_loop().run_in_executor(self._slow, lambda: fn(*args, **kwargs))
