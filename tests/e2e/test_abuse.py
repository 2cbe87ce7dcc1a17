"""Hostile clients against the real server process: an endless upload is cut off, not read to the end."""

import contextlib
import select
import socket
import time
from pathlib import Path

import httpx

from tests.support.server import RemoteServer

KEY = "fs-abuse-test-key-0123456789"


def _read_answer(sock: socket.socket) -> bytes:
    """The head and the JSON body after it (they may come in separate reads)."""
    data = b""
    # The server may close while the client is still sending: what arrived before the reset is the answer.
    with contextlib.suppress(ConnectionResetError):
        while not data.rstrip().endswith(b"}") and (chunk := sock.recv(4096)):
            data += chunk
    return data


def test_an_endless_chunked_upload_gets_413_after_the_limit(tmp_path: Path, demo_model_dir: Path) -> None:
    srv = RemoteServer(tmp_path / "data", api_key=KEY, demo_model=demo_model_dir).start()
    try:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        sock.sendall(
            b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: multipart/form-data; boundary=abc\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        part = b'--abc\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))  # a file part that never ends
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        sent, start = 0, time.monotonic()
        while sent < 1024**3 and time.monotonic() - start < 60:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered mid-upload
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 65536
        head = _read_answer(sock)
        sock.close()
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        assert b"104857600" in head  # the limit is named
        assert sent < 200 * 1024 * 1024, sent  # stopped near 100 MB, not read to 1 GB
    finally:
        srv.stop()


def test_a_stalled_body_gets_408_and_the_server_stays_responsive(tmp_path: Path, demo_model_dir: Path) -> None:
    srv = RemoteServer(
        tmp_path / "data", api_key=KEY, demo_model=demo_model_dir, env={"FLUXSERVE_BODY_IDLE_TIMEOUT_S": "1"}
    ).start()
    try:
        stalled = []
        for _ in range(20):  # slow clients that promise a body and never send it
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sock.sendall(
                b"POST /v1/flux-dev HTTP/1.1\r\nHost: x\r\nx-key: "
                + KEY.encode()
                + b'\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"prompt"'
            )
            stalled.append(sock)
        start = time.monotonic()
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200  # others are served meanwhile
        heads = [_read_answer(sock) for sock in stalled]
        assert all(h.startswith(b"HTTP/1.1 408") and b"stopped arriving for 1 s" in h for h in heads), heads[0]
        assert time.monotonic() - start < 5
        for sock in stalled:
            sock.close()
    finally:
        srv.stop()


def test_slow_headers_get_408_and_the_server_stays_responsive(tmp_path: Path, demo_model_dir: Path) -> None:
    srv = RemoteServer(
        tmp_path / "data", api_key=KEY, demo_model=demo_model_dir, env={"FLUXSERVE_HEADER_TIMEOUT_S": "1"}
    ).start()
    try:
        slow = []
        for i in range(20):  # half send a few header bytes and stop, half send nothing at all
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            if i % 2:
                sock.sendall(b"POST /v1/flux-dev HTTP/1.1\r\nHost: x\r\nx-ke")
            slow.append(sock)
        start = time.monotonic()
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
        answers = [_read_until_closed(sock) for sock in slow]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0]
        assert time.monotonic() - start < 5
        # A normal keep-alive client is unaffected: two requests on one connection, 1.5 s apart.
        with httpx.Client(base_url=srv.url) as http:
            assert http.get("/health").status_code == 200
            time.sleep(1.5)
            assert http.get("/health").status_code == 200
    finally:
        srv.stop()


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    sock.close()
    return data
