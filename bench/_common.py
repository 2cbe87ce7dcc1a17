"""Shared bits of the benchmarks: a fluxserve server process and medians. Not part of the test suite."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

KEY = "fs-bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FLUXSERVE_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    exe = str(Path(sys.executable).with_name("fluxserve"))
    cmd = [exe, "serve", "--demo", "--port", str(port), "--data-dir", str(data_dir), *extra]
    log = open(data_dir.parent / "server.log", "wb")  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["status"] == "ready":
                return proc
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("fluxserve did not become ready")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(60)


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)
