"""Stored keys are remembered for a few seconds (issue 38: no database read per request), and a revoked or
changed key is forgotten at once: on SQLite by the key marker (another process's `keys revoke` too), on
PostgreSQL by NOTIFY to every node (tests/pg/test_pg_queue.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fluxserve.auth import Authenticator, create_key
from fluxserve.errors import Unauthorized
from fluxserve.migrations import open_store
from fluxserve.store import Store


class CountingStore:
    """The real store, its key reads counted."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reads = 0

    def find_key(self, digest: str) -> object:
        self.reads += 1
        return self.store.find_key(digest)

    def keys_version(self) -> int:
        return self.store.keys_version()


def test_a_key_is_read_once_then_remembered_and_forgotten_when_revoked(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        key = create_key(store, "ci")
        counted = CountingStore(store)
        auth = Authenticator(counted, None)  # type: ignore[arg-type]
        assert [auth.owner_for(key.key) for _ in range(50)] == [key.id] * 50
        assert counted.reads == 1
        with pytest.raises(Unauthorized):
            auth.owner_for("fs-not-a-key")
        with pytest.raises(Unauthorized):
            auth.owner_for("fs-not-a-key")
        assert counted.reads == 3  # unknown keys are never remembered
        assert store.revoke_key("ci") == 1
        with pytest.raises(Unauthorized):
            auth.owner_for(key.key)
    finally:
        store.close()


def test_a_revocation_by_another_process_counts_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = open_store(url)
    try:
        key = create_key(store, "ci")
        auth = Authenticator(store, None, cache_s=3600.0)  # only the marker can make it forget
        assert auth.owner_for(key.key) == key.id
        code = f"from fluxserve.migrations import open_store; assert open_store({url!r}).revoke_key('ci') == 1"
        subprocess.run([sys.executable, "-c", code], check=True)
        with pytest.raises(Unauthorized):
            auth.owner_for(key.key)
    finally:
        store.close()


def test_a_remembered_key_is_read_again_after_its_time(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        key = create_key(store, "ci")
        counted = CountingStore(store)
        auth = Authenticator(counted, None, cache_s=0.0)  # type: ignore[arg-type]
        auth.owner_for(key.key)
        auth.owner_for(key.key)
        assert counted.reads == 2
    finally:
        store.close()


def test_a_remembered_key_is_known_without_a_read_and_forgotten_with_a_revocation(tmp_path: Path) -> None:
    """The event loop answers a remembered key itself (no thread hop, no read); an unknown, a new or a revoked
    key is left to owner_for, which reads it."""
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        key = create_key(store, "ci")
        counted = CountingStore(store)
        auth = Authenticator(counted, "the-operators-key")  # type: ignore[arg-type]
        assert auth.known_owner("the-operators-key") == auth.env_owner("the-operators-key")
        assert auth.known_owner(key.key) is None and auth.known_owner(None) is None  # not read yet: owner_for
        assert auth.owner_for(key.key) == key.id
        assert [auth.known_owner(key.key) for _ in range(20)] == [key.id] * 20
        assert counted.reads == 1
        assert store.revoke_key("ci") == 1
        assert auth.known_owner(key.key) is None  # the marker moved: forgotten, owner_for reads (and refuses)
        with pytest.raises(Unauthorized):
            auth.owner_for(key.key)
    finally:
        store.close()
