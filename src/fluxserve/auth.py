"""API keys: stored as SHA-256 hashes; a key's id is the owner of the jobs it creates."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from .errors import Unauthorized
from .store import Store

KEY_PREFIX = "fs-"
KEY_CACHE_S = 5.0  # how long a stored key's owner is trusted without a read; a revocation elsewhere waits this
KEY_CACHE_SIZE = 10_000  # keys remembered at most (the least recently used go first)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    id: str
    name: str
    key: str


def create_key(store: Store, name: str, *, admin: bool = False) -> NewKey:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(key)
    key_id = "key_" + digest[:12]
    store.add_key(key_id, name, digest, key[:7], admin=admin)
    return NewKey(key_id, name, key)


class Authenticator:
    """Presented keys to owners. A stored key's owner is remembered for KEY_CACHE_S (otherwise a database read
    and a thread hop per request); revoking or changing a key makes every node forget them all: on SQLite by
    the key marker's mtime (one stat per request, so `fluxserve keys revoke` in another process counts at
    once), on PostgreSQL by its NOTIFY (``forget``); a node that misses that notice trusts a revoked key at most
    KEY_CACHE_S longer. Unknown keys are never remembered."""

    def __init__(self, store: Store, env_key: str | None, cache_s: float = KEY_CACHE_S) -> None:
        self._store = store
        self._env_hash = hash_key(env_key) if env_key else None
        self._cache_s = cache_s
        self._known: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._version = store.keys_version()

    def forget(self) -> None:
        """A key was revoked or changed (here or on another node): read every key again."""
        with self._lock:
            self._known.clear()

    def _remembered(self, digest: str) -> str | None:
        with self._lock:
            hit = self._known.get(digest)
            if hit is None or hit[1] < time.monotonic():
                return None
            self._known.move_to_end(digest)
            return hit[0]

    def _remember(self, digest: str, owner: str) -> None:
        with self._lock:
            self._known[digest] = (owner, time.monotonic() + self._cache_s)
            self._known.move_to_end(digest)
            while len(self._known) > KEY_CACHE_SIZE:
                self._known.popitem(last=False)

    def env_owner(self, key: str | None) -> str | None:
        """The owner for the operator's FLUXSERVE_API_KEY, or None for any other key."""
        if not key or self._env_hash is None:
            return None
        digest = hash_key(key)
        return "env_" + digest[:12] if secrets.compare_digest(digest, self._env_hash) else None

    def known_owner(self, key: str | None) -> str | None:
        """The owner of the operator's key or of a key remembered from an earlier request, with no database
        read (one stat of the key marker on SQLite): what the event loop asks before it hops to a thread for
        ``owner_for``, which a stored key's first request needs. None: ask ``owner_for``."""
        if not key:
            return None
        owner = self.env_owner(key)
        if owner is not None:
            return owner
        self._check_version()
        return self._remembered(hash_key(key))

    def _check_version(self) -> None:
        version = self._store.keys_version()
        if version != self._version:  # a key changed on this SQLite database, maybe in another process
            self.forget()
            self._version = version

    def owner_for(self, key: str | None) -> str:
        """The owner id for a presented key, or Unauthorized."""
        if not key:
            raise Unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        owner = self.env_owner(key)
        if owner is not None:
            return owner
        digest = hash_key(key)
        self._check_version()
        remembered = self._remembered(digest)
        if remembered is not None:
            return remembered
        row = self._store.find_key(digest)
        if row is None:
            raise Unauthorized("Incorrect API key provided.")
        self._remember(digest, str(row.id))
        return str(row.id)

    def is_admin(self, owner: str) -> bool:
        """The operator's key, or a key created with --admin."""
        return owner.startswith("env_") or self._store.key_is_admin(owner)


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
