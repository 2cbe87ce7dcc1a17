"""What ships as containers, built and run: the Dockerfile's `api` and `cpu` images, deploy/compose.yaml with
the demo worker (PostgreSQL, an S3 server, the schema one-shot, two API nodes), the seed's curl examples and a
Replicate prediction through it, a worker container killed mid-job and its job run again, then `down -v`.

No registry is reachable here: tests/support/docker.py makes the base images (and says how); the test needs a
Docker engine to start and fails, not skips, where it cannot."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_seed_curl import curl
from tests.support.docker import ROOT, STANDINS, Docker, docker_engine
from tests.support.pg import _free_port
from tests.support.polling import wait_for

KEY = "fs-container-" + secrets.token_hex(8)
COMPOSE = [ROOT / "deploy" / "compose.yaml", STANDINS / "compose.ci.yaml"]


def _torch_wheel() -> Path:
    """The CPU torch wheel pip installed here, from pip's local wheel folder, for the cpu image's torch step."""
    import torch

    version = torch.__version__.split("+")[0]
    found = sorted(Path("/opt/wheels").glob(f"torch-{version}+cpu-*.whl"))
    assert found, f"no torch {version} CPU wheel in /opt/wheels to build the cpu image from"
    return found[0]


def _build(docker: Docker) -> dict[str, float]:
    wheel = _torch_wheel()
    target = ROOT / "wheels" / wheel.name
    if not target.exists():
        try:
            os.link(wheel, target)
        except OSError:
            shutil.copy(wheel, target)
    version = wheel.name.split("-")[1]
    seconds = {"api": docker.build("fluxserve:api", ROOT, "--target", "api")}
    seconds["cpu"] = docker.build(
        "fluxserve:cpu", ROOT, "--target", "engine", "--build-arg", f"TORCH=--find-links /wheels torch=={version}"
    )
    return seconds


def _psql(docker: Docker, project: str, query: str) -> str:
    return docker.compose(
        project,
        "exec",
        "-T",
        "postgres",
        "psql",
        "-U",
        "fluxserve",
        "-d",
        "fluxserve",
        "-At",
        "-c",
        query,
        files=COMPOSE,
    ).strip()


AUTH = {"Authorization": f"Bearer {KEY}"}
SEED_BODY = '{"model": "flux", "prompt": "a white siamese cat", "n": 1, "size": "1024x1024"}'
TASK_BODY = '{"model":"flux-schnell","input":{"prompt":"空气","aspect_ratio":"1:1"}}'


def _ready(url: str) -> bool:
    try:
        health = httpx.get(f"{url}/health", timeout=5).json()
    except (httpx.HTTPError, json.JSONDecodeError):
        return False
    workers = health.get("engine", {}).get("workers", [])
    return health.get("status") == "ready" and any(w.get("state") == "ready" for w in workers)


def _clients(api1: str, api2: str, s3_port: int) -> None:
    """The seed's first example, verbatim but for host and key (the image URL is the S3 server's); the
    relay's task API created on one node and polled on the other; a Replicate prediction, waited for."""
    body = curl(
        f"{api1}/v1/images/generations",
        "-H",
        f"Authorization: Bearer {KEY}",
        "-H",
        "Content-Type: application/json",
        "-d",
        SEED_BODY,
    )
    url = body["data"][0]["url"]
    assert url.startswith(f"http://localhost:{s3_port}/") and "X-Amz-Signature" in url
    png = subprocess.run(["curl", "-sS", "--fail", url], capture_output=True, check=True, timeout=60).stdout
    assert png.startswith(b"\x89PNG")
    created = curl(
        "--request",
        "POST",
        "--url",
        f"{api2}/vmodel/generate",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--header",
        "Content-Type: application/json",
        "--data",
        TASK_BODY,
    )
    feed = wait_for(
        lambda: curl(f"{api1}/vmodel/feed/{created['id']}", "-H", f"Authorization: Bearer {KEY}"),
        lambda f: f["status"] in ("succeeded", "failed"),
        timeout=120,
    )
    assert feed["status"] == "succeeded", feed
    pred = httpx.post(
        f"{api2}/v1/models/black-forest-labs/flux-schnell/predictions",
        timeout=120,
        headers=AUTH | {"Prefer": "wait=60"},
        json={"input": {"prompt": "a lighthouse"}},
    )
    assert pred.status_code == 201 and pred.json()["status"] == "succeeded", pred.text


def _killed_worker(docker: Docker, project: str, api1: str, api2: str) -> None:
    """The worker container SIGKILLed mid-job: its lease runs out, the restarted worker runs the job again,
    and the job ends once."""
    long = httpx.post(
        f"{api1}/v1/models/black-forest-labs/flux-dev/predictions",
        headers=AUTH,
        timeout=30,
        json={"input": {"prompt": "interrupted", "num_inference_steps": 50}},
    )
    job_id = long.json()["id"]

    def get(api: str) -> dict[str, Any]:
        return httpx.get(f"{api}/v1/predictions/{job_id}", headers=AUTH, timeout=10).json()  # type: ignore[no-any-return]

    wait_for(lambda: get(api1)["status"], lambda s: s == "processing", timeout=120, interval=0.1)
    docker.compose(project, "kill", "-s", "SIGKILL", "demo-worker", files=COMPOSE)
    docker.compose(project, "--profile", "demo", "up", "-d", "demo-worker", files=COMPOSE)
    final = wait_for(lambda: get(api2), lambda p: p["status"] in ("succeeded", "failed", "canceled"), timeout=240)
    assert final["status"] == "succeeded", final
    assert _psql(docker, project, f"SELECT attempts FROM jobs WHERE id = '{job_id}'") == "2"
    ends = _psql(
        docker,
        project,
        f"SELECT count(*) FROM job_events WHERE job_id = '{job_id}' "
        "AND kind IN ('succeeded', 'failed', 'canceled', 'aborted')",
    )
    assert ends == "1"


@pytest.mark.timeout(900)
def test_the_images_and_compose_stack_serve_clients_and_survive_a_killed_worker() -> None:
    start = time.monotonic()
    timings: dict[str, float] = {}
    with docker_engine() as docker:
        timings["engine+base images"] = time.monotonic() - start
        for name, took in _build(docker).items():
            timings[f"build {name}"] = took
        sizes = {tag: docker.size_mb(tag) for tag in ("fluxserve:api", "fluxserve:cpu")}
        # The api image is the slim one: no torch in it.
        no_torch = docker.run(
            "run",
            "--rm",
            "--entrypoint",
            "python",
            "fluxserve:api",
            "-c",
            "import importlib.util as u; print(u.find_spec('torch') is None)",
        )
        assert no_torch.strip() == "True"

        ports = {name: _free_port() for name in ("FLUXSERVE_API_PORT", "FLUXSERVE_API2_PORT", "FLUXSERVE_S3_PORT")}
        api1 = f"http://127.0.0.1:{ports['FLUXSERVE_API_PORT']}"
        # compose.yaml refuses to start without these (no example secret ships in it).
        keys = {"FLUXSERVE_API_KEY": KEY, "FLUXSERVE_S3_PASSWORD": secrets.token_hex(12), "FLUXSERVE_PUBLIC_URL": api1}
        docker.env |= {k: str(v) for k, v in ports.items()} | keys | {"FLUXSERVE_LEASE_S": "3"}
        project = "fsci" + secrets.token_hex(3)
        api2 = f"http://127.0.0.1:{ports['FLUXSERVE_API2_PORT']}"
        try:
            up = time.monotonic()
            docker.compose(project, "--profile", "demo", "up", "-d", files=COMPOSE)
            wait_for(lambda: _ready(api1) and _ready(api2), lambda ok: ok, timeout=240, interval=1)
            timings["compose up to ready"] = time.monotonic() - up
            container = f"{project}_api-1_1"  # the image's HEALTHCHECK, and its non-root user
            wait_for(
                lambda: docker.run("inspect", "-f", "{{.State.Health.Status}}", container).strip(),
                lambda s: s == "healthy",
                timeout=60,
                interval=1,
            )
            assert docker.run("exec", container, "id", "-u").strip() != "0"
            _clients(api1, api2, ports["FLUXSERVE_S3_PORT"])
            _killed_worker(docker, project, api1, api2)
        except Exception:
            print(docker.compose(project, "logs", "--tail", "60", files=COMPOSE, check=False)[-12000:])
            raise
        finally:
            docker.compose(project, "--profile", "demo", "down", "-v", "-t", "2", files=COMPOSE, check=False)
    timings["total"] = time.monotonic() - start
    print(json.dumps({"seconds": {k: round(v, 1) for k, v in timings.items()}, "image_mb": sizes}))
