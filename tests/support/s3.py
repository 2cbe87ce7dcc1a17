"""A local S3-compatible server for the storage tests: ministack with AUTH=true, the one small server found
that checks presigned SigV4 signatures and their expiry (moto and s3rver check neither; see
../shared/reference/scale-out-notes.md). It pins its own botocore, so it lives in a venv of its own,
made once per machine; started on a free loopback port and stopped after the session."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.pg import _free_port

MINISTACK = "ministack==1.5.33"
VENV = Path(tempfile.gettempdir()) / "fluxserve-test-ministack"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "FLUXSERVE_S3_ENDPOINT_URL": self.endpoint,
        }

    def bucket(self) -> str:
        name = "t" + secrets.token_hex(6)
        assert httpx.put(f"{self.endpoint}/{name}", timeout=10).status_code == 200
        return name


def _install() -> Path:
    exe = VENV / "bin" / "ministack"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", MINISTACK], check=True, timeout=600)
    return exe


class MiniStack:
    """One ministack process on a fixed port and data folder, so a test can stop it (an object-store outage)
    and start it again with its buckets and objects as they were (S3_PERSIST, PERSIST_STATE)."""

    def __init__(self) -> None:
        self.exe = _install()
        port = _free_port()
        self.server = S3Server(f"http://127.0.0.1:{port}", "AKID" + secrets.token_hex(6).upper(), secrets.token_hex(16))
        self.data = Path(tempfile.mkdtemp(prefix="fluxserve-s3-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLUXSERVE_"))}
        self.env = env | {
            "AUTH": "true",
            "GATEWAY_PORT": str(port),
            "BIND_HOST": "127.0.0.1",
            "S3_DATA_DIR": str(self.data / "s3"),
            "S3_PERSIST": "1",
            "PERSIST_STATE": "1",
            "STATE_DIR": str(self.data / "state"),
            "AWS_ACCESS_KEY_ID": self.server.access_key,
            "AWS_SECRET_ACCESS_KEY": self.server.secret_key,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MiniStack:
        with open(self.data / "ministack.log", "ab") as log:
            self.proc = subprocess.Popen([str(self.exe)], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(self.server.endpoint, timeout=1)
                return self
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((self.data / "ministack.log").read_text()[-3000:]) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@contextmanager
def ministack() -> Iterator[S3Server]:
    stack = MiniStack().start()
    try:
        yield stack.server
    finally:
        stack.stop()
