"""RemoteServer: the real `fluxserve serve` process on a free loopback port, ready when /health says so."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.support.polling import wait_for

FLUXSERVE = str(Path(sys.executable).with_name("fluxserve"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RemoteServer:
    def __init__(
        self,
        data_dir: Path,
        *,
        api_key: str | None,
        demo_model: Path | None = None,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        wrap: tuple[str, ...] = (),
        demo: bool = True,
    ) -> None:
        self.demo = demo  # False: the real-weights path (--model-config), e.g. from a fake hub
        self.extra_args = extra_args
        self.extra_env = env or {}
        self.wrap = wrap  # a command the server runs under (unshare for a private tmpfs)
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        data_dir.mkdir(parents=True, exist_ok=True)
        if demo_model is not None and not (data_dir / "demo-model").exists():
            # The same folder `serve --demo` would build; copied to keep each test from rebuilding it.
            shutil.copytree(demo_model, data_dir / "demo-model")
        # Its own log even when a later server gets the same port back from the OS.
        self.log_path = data_dir / f"server-{self.port}-{secrets.token_hex(3)}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120, *, until: str = "ready") -> RemoteServer:
        """Start it and wait until /health shows ``until`` ("error": a model that could not load)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXSERVE_")}
        env["HF_HUB_OFFLINE"] = "1"
        if self.api_key:
            env["FLUXSERVE_API_KEY"] = self.api_key
        cmd = [FLUXSERVE, "serve", *(["--demo"] if self.demo else []), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--data-dir", str(self.data_dir), *self.extra_args]
        env |= self.extra_env
        cmd = [*self.wrap, *cmd]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).json().get("status") == until:
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self._log.close()

    def wait_feed(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        """Poll the relay task API until the job is terminal."""

        def feed() -> dict[str, Any]:
            return httpx.get(f"{self.url}/vmodel/feed/{job_id}", headers=self.headers).json()  # type: ignore[no-any-return]

        return wait_for(feed, lambda body: body["status"] in ("succeeded", "failed"), timeout=timeout, interval=0.2)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def __enter__(self) -> RemoteServer:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
