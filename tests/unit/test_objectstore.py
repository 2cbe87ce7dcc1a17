"""Object storage: the protocol on obstore's in-memory store, then a real S3-compatible server that checks
presigned signatures and expiry, then the app serving every dialect's images from it."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from obstore.store import MemoryStore

from fluxserve.app import create_app
from fluxserve.settings import Settings
from fluxserve.storage.s3 import S3Storage, expires_in
from tests.conftest import AUTH
from tests.support.fakes import FakeEngine
from tests.support.s3 import S3Server


def test_the_storage_protocol_on_an_in_memory_store() -> None:
    st = S3Storage(MemoryStore(), ttl_s=3600)
    st.put("job1/out-0.png", b"png bytes")
    st.put("job1/out-0.png", b"png bytes, again")  # a re-run overwrites its fixed key
    assert st.read("job1/out-0.png") == b"png bytes, again"
    st.put("inputs/aa/0.png", b"a")
    st.put("inputs/bb/0.png", b"b")
    assert sorted(st.stale_input_folders(time.time() + 60)) == ["inputs/aa", "inputs/bb"]
    assert st.stale_input_folders(time.time() - 60) == []
    st.delete_folder("inputs/aa")
    assert st.stale_input_folders(time.time() + 60) == ["inputs/bb"]
    st.delete("job1/out-0.png")
    st.delete("job1/out-0.png")  # idempotent
    with pytest.raises(FileNotFoundError):
        st.read("job1/out-0.png")
    for bad in ("../etc/passwd", "a/../b", "/abs", ""):
        with pytest.raises(ValueError):
            st.put(bad, b"x")


def test_presigned_urls_are_checked_and_expire(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.bucket()
    st = S3Storage.from_env(bucket, "prefix", 3600, s3_server.endpoint)
    st.put("job/out-0.png", b"\x89PNG not really")
    url = st.url("job/out-0.png")
    assert 3590 < expires_in(url) <= 3600
    got = httpx.get(url, timeout=10)
    assert got.status_code == 200 and got.content == b"\x89PNG not really"
    assert got.headers["content-type"] == "image/png"
    assert httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"), timeout=10).status_code == 403
    assert httpx.get(url.replace("out-0.png", "out-1.png"), timeout=10).status_code == 403  # another key
    # Clients reach the store at another address than the nodes do (containers): signed for that one.
    public = s3_server.endpoint.replace("127.0.0.1", "localhost")
    outside = S3Storage.from_env(bucket, "prefix", 3600, s3_server.endpoint, public).url("job/out-0.png")
    assert outside.startswith(public + "/") and httpx.get(outside, timeout=10).status_code == 200
    assert httpx.get(outside.replace("localhost", "127.0.0.1"), timeout=10).status_code == 403  # host is signed
    # 3 s: time enough for the first fetch on a loaded machine (1 s failed once under two test processes).
    short = S3Storage.from_env(bucket, "prefix", 3, s3_server.endpoint).url("job/out-0.png")
    assert httpx.get(short, timeout=10).status_code == 200
    time.sleep(4.2)
    assert httpx.get(short, timeout=10).status_code == 403  # expired


def test_the_app_stores_and_hands_out_images_through_s3(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    settings = Settings(
        data_dir=tmp_path / "data",
        api_key="test-key-0123456789",
        storage=f"s3://{s3_server.bucket()}/fs",
        s3_endpoint_url=s3_server.endpoint,
    )
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        body = {"model": "flux-schnell", "prompt": "p", "size": "256x256"}
        url = client.post("/v1/images/generations", json=body, headers=AUTH).json()["data"][0]["url"]
        assert url.startswith(s3_server.endpoint) and "X-Amz-Signature" in url
        image = httpx.get(url, timeout=10)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        b64 = client.post("/v1/images/generations", json=body | {"response_format": "b64_json"}, headers=AUTH)
        assert base64.b64decode(b64.json()["data"][0]["b64_json"]).startswith(b"\x89PNG")
        # An edit: the input goes to the object store, the worker reads it back from there.
        edit = client.post(
            "/v1/images/edits",
            data={"model": "flux-kontext-pro", "prompt": "p"},
            files={"image": ("in.png", image.content, "image/png")},
            headers=AUTH,
        )
        assert edit.status_code == 200, edit.text
        # Object stores hand out their own URLs: the local /files route has nothing to serve.
        key = url.split("/fs/", 1)[1].split("?", 1)[0]
        assert client.get(f"/files/{key}?expires=9999999999&sig=x").status_code == 404


def test_an_unreachable_store_is_a_503_with_retry_after_and_no_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support.pg import _free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNOTHING")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nothing")
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    settings = Settings(
        data_dir=tmp_path / "data", api_key="test-key-0123456789", storage="s3://b/fs", s3_endpoint_url=dead
    )
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        png = base64.b64decode(
            "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
        )
        edit = client.post(
            "/v1/images/edits",
            data={"model": "flux-kontext-pro", "prompt": "p"},
            files={"image": ("in.png", png, "image/png")},
            headers=AUTH,
        )
        assert edit.status_code == 503 and edit.headers["Retry-After"], edit.text
        assert edit.json()["error"]["code"] == "storage_unavailable"
        assert client.get("/v1/predictions", headers=AUTH).json()["results"] == []


def test_a_worker_waits_for_the_store_then_gives_up_with_its_error() -> None:
    import threading

    from fluxserve.storage import StorageUnreachable
    from fluxserve.workers import LeasedWorker

    class Bare(LeasedWorker):
        def __init__(self, retry_s: float) -> None:
            self.worker_id, self.degraded, self.storage_retry_s = "w", None, retry_s
            self._stopping = threading.Event()

    calls: list[int] = []

    def flaky(n: int) -> str:
        calls.append(n)
        if len(calls) < 3:
            raise StorageUnreachable("object store: connection refused")
        return "stored"

    worker = Bare(retry_s=10)
    assert worker._storage_io(flaky, 7) == "stored" and calls == [7, 7, 7]
    assert worker.degraded is None  # recovered once it answered

    def down() -> None:
        raise StorageUnreachable("object store: connection refused")

    start = time.monotonic()
    with pytest.raises(StorageUnreachable):
        Bare(retry_s=1)._storage_io(down)
    assert 0.4 < time.monotonic() - start < 3
    stopping = Bare(retry_s=60)
    stopping._stopping.set()  # a stopping worker does not wait the window out
    with pytest.raises(StorageUnreachable):
        stopping._storage_io(down)
    assert stopping.degraded == "object store: connection refused"

    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):  # not the store being away: no waiting
        Bare(retry_s=60)._storage_io(disk_full)


def test_a_signed_urls_expiry_is_steady_within_its_step_and_never_short() -> None:
    """Local file and stream URLs expire on a step (a tenth of the TTL, 1 to 60 s), so a job's answer, and its
    ETag, stay the same between polls; a URL still lives at least the TTL."""
    from fluxserve.storage.base import expires_at

    for ttl in (1, 5, 100, 3600, 7 * 86400):
        step = min(60, max(1, ttl // 10))
        for now in (1_796_000_000.0, 1_796_000_000.4, 1_796_000_017.9, 1_796_000_059.99):
            end = expires_at(ttl, now)
            assert end % step == 0 and int(now) + ttl <= end < int(now) + ttl + step, (ttl, now, end)
    assert expires_at(3600, 1_795_999_981) == expires_at(3600, 1_796_000_039)  # one step: the same URL
