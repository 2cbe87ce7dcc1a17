"""Hardening round 4: what real clients and an audit found (issue 35). Each test fails on the code before it."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import AUTH
from tests.support.fakes import FakeEngine
from tests.support.images_util import png_bytes


def test_files_take_metadata_as_a_file_part_as_replicate_js_sends_it(client: TestClient) -> None:
    """replicate-js 1.4's files.create: `content` and `metadata` are both file parts (the second a JSON Blob
    named "blob"); one file part was allowed, so every replicate-js upload was a 422 "Too many files"."""
    up = client.post(
        "/v1/files",
        files=[
            ("content", ("buffer_1", png_bytes((64, 64)), "application/octet-stream")),
            ("metadata", ("blob", b'{"purpose": "edit"}', "application/json")),
        ],
        headers=AUTH,
    )
    assert up.status_code == 201, up.text
    assert up.json()["metadata"] == {"purpose": "edit"}
    three = client.post(
        "/v1/files",
        files=[("content", ("a", b"x", "image/png")), ("metadata", ("b", b"{}")), ("extra", ("c", b"x"))],
        headers=AUTH,
    )
    assert three.status_code in (400, 422) and three.status_code != 500


def test_files_refuse_deep_metadata_and_types_that_would_break_the_download(client: TestClient) -> None:
    deep = client.post(
        "/v1/files", files={"content": ("a", b"x", "image/png")}, data={"metadata": "[" * 5000}, headers=AUTH
    )
    assert deep.status_code == 422 and "metadata" in deep.text
    big = client.post(
        "/v1/files",
        files={"content": ("a", b"x", "image/png")},
        data={"metadata": '{"k": "' + "x" * 9000 + '"}'},
        headers=AUTH,
    )
    assert big.status_code == 422 and "8 KB" in big.text
    crlf = client.post(
        "/v1/files",
        files={"content": ("a", b"x", "image/png")},
        data={"type": "image/png\r\nSet-Cookie: a=b"},
        headers=AUTH,
    )
    assert crlf.status_code == 422 and "type" in crlf.text
    ok = client.post(
        "/v1/files", files={"content": ("a", b"x", "image/png")}, data={"type": "image/png; q=1"}, headers=AUTH
    )
    assert ok.status_code == 201, ok.text
    assert client.get(f"/v1/files/{ok.json()['id']}/download", headers=AUTH).headers["content-type"] == (
        "image/png; q=1"
    )


def test_a_blocking_create_not_done_when_its_wait_ends_says_starting(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    """replicate-python's run(wait=N) polls on only for "starting" (replicate.com's answer then) and returned
    None for "processing" (tests/e2e/test_async_clients.py drives the client itself)."""
    fake_engine.step_s = 0.1  # flux-dev's 28 steps: about 3 s
    created = client.post(
        "/v1/models/black-forest-labs/flux-dev/predictions",
        json={"input": {"prompt": "slower than the wait"}},
        headers={**AUTH, "Prefer": "wait=1"},
    )
    assert created.status_code == 201 and created.json()["status"] == "starting", created.json()["status"]
    done = client.post(
        "/v1/models/black-forest-labs/flux-schnell/predictions",
        json={"input": {"prompt": "quick"}},
        headers={**AUTH, "Prefer": "wait=10"},
    )
    assert done.json()["status"] == "succeeded"
