"""API keys: stored as SHA-256 hashes; a key's id is the owner of the jobs it creates."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from .errors import Unauthorized
from .store import Store

KEY_PREFIX = "fs-"


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
    def __init__(self, store: Store, env_key: str | None) -> None:
        self._store = store
        self._env_hash = hash_key(env_key) if env_key else None

    def env_owner(self, key: str | None) -> str | None:
        """The owner for the operator's FLUXSERVE_API_KEY, or None for any other key."""
        if not key or self._env_hash is None:
            return None
        digest = hash_key(key)
        return "env_" + digest[:12] if secrets.compare_digest(digest, self._env_hash) else None

    def owner_for(self, key: str | None) -> str:
        """The owner id for a presented key, or Unauthorized."""
        if not key:
            raise Unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        owner = self.env_owner(key)
        if owner is not None:
            return owner
        row = self._store.find_key(hash_key(key))
        if row is None:
            raise Unauthorized("Incorrect API key provided.")
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
