"""Requests gathering their input images (fetching URLs, reading uploads, decoding base64) at once: at most so
many on this node and so many for one key. Each holds up to images.MAX_REQUEST_BYTES while it gathers, so a
burst of small requests naming large inputs cannot take the node's memory (two 2 KB requests took one from
562 MB to 2.1 GB), and one key's burst waits behind its own slots, not everyone's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class IntakeSlots:
    def __init__(self, per_node: int = 8, per_key: int = 2) -> None:
        self._node = asyncio.Semaphore(per_node)
        self._per_key = per_key
        self._keys: dict[str, tuple[asyncio.Semaphore, int]] = {}  # a key's slots, and how many use them

    @asynccontextmanager
    async def hold(self, owner: str) -> AsyncIterator[None]:
        slots, users = self._keys.get(owner, (asyncio.Semaphore(self._per_key), 0))
        self._keys[owner] = (slots, users + 1)
        try:
            async with slots, self._node:
                yield
        finally:
            slots, users = self._keys[owner]
            if users == 1:
                del self._keys[owner]  # no key is remembered once it gathers nothing
            else:
                self._keys[owner] = (slots, users - 1)
