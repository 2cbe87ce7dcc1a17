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
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": "us-east-1", "FLUXSERVE_S3_ENDPOINT_URL": self.endpoint}  # fmt: skip

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


@contextmanager
def ministack() -> Iterator[S3Server]:
    exe = _install()
    port = _free_port()
    server = S3Server(f"http://127.0.0.1:{port}", "AKID" + secrets.token_hex(6).upper(), secrets.token_hex(16))
    data = Path(tempfile.mkdtemp(prefix="fluxserve-s3-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLUXSERVE_"))}
    env |= {"AUTH": "true", "GATEWAY_PORT": str(port), "BIND_HOST": "127.0.0.1", "S3_DATA_DIR": str(data),
            "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}  # fmt: skip
    log = open(data / "ministack.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(exe)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(server.endpoint, timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((data / "ministack.log").read_text()[-3000:]) from None
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
