"""S3-compatible object storage (obstore): every node reads every job's inputs, previews and outputs;
clients get the store's presigned GETs, which expire after FLUXSERVE_URL_TTL_S (SigV4 caps it at 7 days).

Keys, region and session token come from the usual AWS_* variables; FLUXSERVE_S3_ENDPOINT_URL points it
at an S3-compatible server (MinIO, R2, ...). Presigned URLs embed that endpoint's host: set it to the
address clients reach.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from typing import Any

from .base import StorageUnreachable, valid_key

SIGV4_MAX_S = 7 * 24 * 3600


class S3Storage:
    def __init__(self, store: Any, ttl_s: int, signer: Any = None) -> None:
        self._store = store  # an obstore store: S3Store here, MemoryStore in unit tests
        self._signer = signer or store  # the same store at the address clients use (signing is offline)
        self._ttl = dt.timedelta(seconds=min(ttl_s, SIGV4_MAX_S))

    @classmethod
    def from_env(
        cls, bucket: str, prefix: str, ttl_s: int, endpoint_url: str | None, public_url: str | None = None
    ) -> S3Storage:
        from obstore.store import S3Store

        def store(endpoint: str | None) -> Any:
            config: dict[str, Any] = {}
            if endpoint:  # path-style, as S3-compatible servers expect
                config = {"endpoint": endpoint, "virtual_hosted_style_request": False}
            client: Any = {"allow_http": bool(endpoint and endpoint.startswith("http://"))}
            return S3Store(bucket, prefix=prefix or None, client_options=client, **config)  # AWS_* from the env

        return cls(store(endpoint_url), ttl_s, store(public_url) if public_url else None)

    @staticmethod
    def _key(key: str) -> str:
        if not valid_key(key):
            raise ValueError(f"invalid storage key {key!r}")
        return key

    def put(self, key: str, data: bytes) -> None:
        """Whole objects only: a reader never sees half an image (and a re-run overwrites the same key)."""
        import obstore

        content_type = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}.get(key.rsplit(".", 1)[-1])
        attributes = {"Content-Type": content_type} if content_type else None
        path = self._key(key)
        try:
            obstore.put(self._store, path, data, attributes=attributes)
        except Exception as exc:  # obstore raises its own classes, after its own few quick retries
            raise StorageUnreachable(f"object store: {_short(exc)}") from exc

    def read(self, key: str) -> bytes:
        import obstore

        path = self._key(key)
        try:
            return bytes(obstore.get(self._store, path).bytes())
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise StorageUnreachable(f"object store: {_short(exc)}") from exc

    def url(self, key: str) -> str:
        import obstore

        return str(obstore.sign(self._signer, "GET", self._key(key), self._ttl))

    def delete(self, key: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):  # idempotent, as the local store is
            obstore.delete(self._store, self._key(key))

    def stale_input_folders(self, before: float) -> list[str]:
        """inputs/<id> prefixes whose newest object is older than then (the orphan sweep)."""
        import obstore

        newest: dict[str, float] = {}
        for chunk in obstore.list(self._store, prefix="inputs/"):
            for meta in chunk:
                parts = str(meta["path"]).split("/")
                if len(parts) >= 3:
                    folder = "/".join(parts[:2])
                    newest[folder] = max(newest.get(folder, 0.0), meta["last_modified"].timestamp())
        return [f for f, t in newest.items() if t < before]

    def delete_folder(self, prefix: str) -> None:
        import obstore

        for chunk in obstore.list(self._store, prefix=self._key(prefix) + "/"):
            for meta in chunk:
                self.delete(str(meta["path"]))


def _short(exc: Exception) -> str:
    """obstore's messages carry a multi-line debug dump after the first line; job errors keep the first."""
    return str(exc).split("\n", 1)[0][:300]


def expires_in(url: str) -> float:
    """Seconds a presigned URL has left (X-Amz-Date + X-Amz-Expires), for tests and diagnostics."""
    from urllib.parse import parse_qs, urlsplit

    q = parse_qs(urlsplit(url).query)
    signed = dt.datetime.strptime(q["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    return signed.timestamp() + int(q["X-Amz-Expires"][0]) - time.time()
