"""Where images live: a local folder (local.py, URLs signed by us) or an S3-compatible store (s3.py, presigned
GETs), behind base.Storage. Storage knows nothing of jobs."""

from __future__ import annotations

from pathlib import Path

from .base import Storage, StorageUnreachable, valid_key
from .local import LocalStorage, load_or_create_secret
from .s3 import S3Storage


def build_storage(
    spec: str | None,
    default_root: Path,
    secret: bytes,
    base_url: str,
    ttl_s: int,
    endpoint_url: str | None = None,
    public_url: str | None = None,
) -> Storage:
    """--storage: file:///path (or none: the data dir's outputs folder) or s3://bucket/prefix."""
    if spec is None or spec.startswith("file://"):
        root = Path(spec.removeprefix("file://")) if spec else default_root
        return LocalStorage(root, secret, base_url, ttl_s)
    if spec.startswith("s3://"):
        bucket, _, prefix = spec.removeprefix("s3://").partition("/")
        return S3Storage.from_env(bucket, prefix.strip("/"), ttl_s, endpoint_url, public_url)
    raise ValueError(f"storage must be file:///path or s3://bucket/prefix; got {spec!r}")


__all__ = [
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StorageUnreachable",
    "build_storage",
    "load_or_create_secret",
    "valid_key",
]
