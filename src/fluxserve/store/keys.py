"""api_keys and the one server secret every node shares."""

from __future__ import annotations

import functools
import secrets
import time
from pathlib import Path
from typing import Any

from sqlalchemy import and_, bindparam, func, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from ..limits import Limits
from .db import Database
from .events import KEYS_CHANGED, NOTIFY_CHANNEL
from .schema import api_keys, server_secrets

# Built once: every metered create reads it.
_LIMITS = select(api_keys.c.max_queued, api_keys.c.rpm, api_keys.c.images_per_day).where(
    api_keys.c.id == bindparam("owner")
)


def key_limits(conn: Connection, owner: str) -> Limits:
    """A key's own limits (None: the server's default), read inside the caller's transaction."""
    row = conn.execute(_LIMITS, {"owner": owner}).first()
    return Limits(row.max_queued, row.rpm, row.images_per_day) if row else Limits()


class KeyQueries(Database):
    def add_key(self, key_id: str, name: str, key_hash: str, prefix: str, *, admin: bool = False) -> None:
        with self._write() as conn:
            conn.execute(
                api_keys.insert().values(
                    id=key_id, name=name, key_hash=key_hash, prefix=prefix, created_at=time.time(), admin=admin
                )
            )

    def key_is_admin(self, key_id: str) -> bool:
        with self._read() as conn:
            return bool(conn.execute(select(api_keys.c.admin).where(api_keys.c.id == key_id)).scalar())

    def find_key(self, key_hash: str) -> Row[Any] | None:
        with self._read() as conn:
            return conn.execute(
                select(api_keys).where(and_(api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None)))
            ).first()

    def list_keys(self) -> list[Row[Any]]:
        with self._read() as conn:
            return list(conn.execute(select(api_keys).order_by(api_keys.c.created_at)))

    def count_keys(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(api_keys)).scalar_one())

    def set_key_limits(self, id_or_name: str, limits: Limits) -> int:
        """Set the given limits (None leaves one as it is) on the active key(s) with this id or name."""
        values = {k: v for k, v in vars(limits).items() if v is not None}
        return self._update_active_key(id_or_name, values) if values else 0

    def revoke_key(self, id_or_name: str) -> int:
        return self._update_active_key(id_or_name, {"revoked_at": time.time()})

    def _update_active_key(self, id_or_name: str, values: dict[str, Any]) -> int:
        active = and_((api_keys.c.id == id_or_name) | (api_keys.c.name == id_or_name), api_keys.c.revoked_at.is_(None))
        with self._write() as conn:
            changed = conn.execute(update(api_keys).where(active).values(**values)).rowcount
            if changed and conn.dialect.name == "postgresql":  # every node forgets its remembered keys at commit
                conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, f"{KEYS_CHANGED}:changed")))
        if changed and self._keys_marker is not None:
            self._keys_marker.touch()
        return int(changed)

    @functools.cached_property
    def _keys_marker(self) -> Path | None:
        """SQLite: a file beside the database that every key change touches, so the server sees a change made
        by another process (`fluxserve keys revoke`) with one stat per request; PostgreSQL: none (NOTIFY)."""
        return Path(self.url.removeprefix("sqlite:///") + "-keys") if self.url.startswith("sqlite:///") else None

    def keys_version(self) -> int:
        """Changes whenever a key is revoked or changed on this SQLite database (0 on PostgreSQL, or none yet)."""
        marker = self._keys_marker
        try:
            return marker.stat().st_mtime_ns if marker is not None else 0
        except FileNotFoundError:
            return 0

    def shared_secret(self) -> bytes:
        """The one server secret of every node on this database, made by whichever node asks first."""
        query = select(server_secrets.c.value).where(server_secrets.c.name == "server")
        with self._read() as conn:
            value = conn.execute(query).scalar()
        if value is None:
            try:
                with self._write() as conn:
                    conn.execute(
                        server_secrets.insert().values(
                            name="server", value=secrets.token_hex(32), created_at=time.time()
                        )
                    )
            except IntegrityError:
                pass  # another node made it first: read theirs
            with self._read() as conn:
                value = conn.execute(query).scalar_one()
        return bytes.fromhex(value)
