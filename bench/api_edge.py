"""The API edge at gateway cost (issue 38): CPU per create and per poll, idle CPU, poll throughput at a p99
bound, and a relay hop's added latency beside LiteLLM's, all in one run.

    python bench/api_edge.py [--hops 200] [--requests 1000] [--litellm PATH] [--json out.json]

It re-runs itself inside a loopback-only network namespace (``unshare -n``, then ``ip link set lo up``):
nothing it starts can reach past this machine, and LiteLLM (``LITELLM_LOCAL_MODEL_COST_MAP=True``) does not
try to fetch its cost map. LiteLLM lives in the bench's own venv, never the project's:

    python -m venv bench/.venv-litellm && bench/.venv-litellm/bin/pip install 'litellm[proxy]==1.108.7'

edge: a SQLite ``serve --demo`` (its worker asleep, so jobs stay queued) and a PostgreSQL ``serve --api-only``
  (a throwaway cluster, tests/support/pg.py), each with two upstreams of max_in_flight = 16 configured. CPU is
  the node's own utime + stime from /proc over the requests (all its threads) per request; creates are JSON
  without input images (Replicate, BFL, the relay, a third each), polls are each dialect's GET of them.
  Throughput: polls at rising concurrency, the most per second whose p99 stays within 10 ms and 50 ms.
  Idle: the node's CPU per second over 10 s with nothing asked of it.
hop: an OpenAI-shaped fake upstream answering a fixed 256x256 PNG after 2 ms; c=1, interleaved: the fake
  directly, fluxserve (``serve --demo``, the model routed to the fake as an ``openai`` upstream; once as it ships,
  marking every image, once with ``--provenance off``), LiteLLM proxy
  (``openai/...`` at the fake, ``drop_params: true``); ``b64_json`` and ``url``. Added latency = the route's
  percentile minus the direct call's. Loopback on this machine; never part of the tests' pass/fail.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import KEY, free_port, start_server

FLUXSERVE = str(Path(sys.executable).with_name("fluxserve"))
AUTH = {"Authorization": f"Bearer {KEY}"}
LITELLM_KEY = "sk-bench-litellm"
ROUTED = "flux-2-pro"  # the model fluxserve and LiteLLM send to the fake


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def pct(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the fake upstream --------------------------------------------------------------------------


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (40, 90, 160)).save(buf, "PNG")
    return buf.getvalue()


class FakeOpenAI(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.png = _png()
        self.b64 = base64.b64encode(self.png).decode()
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _FakeHandler(BaseHTTPRequestHandler):
    server: FakeOpenAI
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body go out at once, no delayed-ACK stall

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(self.server.png, "image/png")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        time.sleep(0.002)
        item = (
            {"url": f"{self.server.url}/img/{time.time_ns()}.png"}
            if body.get("response_format") == "url"
            else {"b64_json": self.server.b64}
        )
        out = {"created": int(time.time()), "data": [item], "output_format": "png", "size": "256x256"}
        self._send(json.dumps(out).encode(), "application/json")


# -- the servers ----------------------------------------------------------------------------------


def fluxserve_config(fake: str) -> str:
    upstream = "max_in_flight = 16\nretries = 1\ntimeout_s = 60\n"
    return f"""
[upstreams.oai]
kind = "openai"
base_url = "{fake}/v1"
api_key_env = "FAKE_KEY"
idempotent = true
{upstream}
[upstreams.spare]
kind = "bfl"
base_url = "{fake}"
api_key_env = "FAKE_KEY"
{upstream}
[models.{ROUTED}]
upstream = "oai"

[models.flux-pro]
upstream = "spare"
upstream_model = "flux-pro-1.1"
"""


def start_litellm(binary: str, fake: str, work: Path) -> subprocess.Popen[bytes]:
    config = work / "litellm.yaml"
    config.write_text(
        f"model_list:\n  - model_name: {ROUTED}\n    litellm_params:\n      model: openai/{ROUTED}\n"
        f"      api_base: {fake}/v1\n      api_key: sk-fake\n"
        f"litellm_settings:\n  drop_params: true\ngeneral_settings:\n  master_key: {LITELLM_KEY}\n"
    )
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    log = open(work / "litellm.log", "wb")  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen(
        [binary, "--config", str(config), "--port", str(port), "--host", "127.0.0.1", "--num_workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{proc.url}/health/liveliness", timeout=2).status_code == 200:  # type: ignore[attr-defined]
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"LiteLLM did not start: {(work / 'litellm.log').read_text()[-2000:]}")


# -- the measurements -------------------------------------------------------------------------------


def edge(url: str, pid: int, n: int, clients: int) -> dict[str, Any]:
    """CPU per create and per poll, poll throughput within a p99 bound, idle CPU per second."""
    with httpx.Client(timeout=30, headers=AUTH, limits=httpx.Limits(max_connections=64)) as client:

        def create(i: int) -> str:
            if i % 3 == 0:
                body: dict[str, Any] = {"input": {"prompt": f"p{i}", "num_inference_steps": 4}}
                resp = client.post(f"{url}/v1/models/black-forest-labs/flux-dev/predictions", json=body)
                path = "/v1/predictions/{}"
            elif i % 3 == 1:
                resp = client.post(f"{url}/v1/flux-dev", json={"prompt": f"p{i}", "width": 256, "height": 256})
                path = "/v1/get_result?id={}"
            else:
                resp = client.post(f"{url}/vmodel/generate", json={"model": "flux-schnell", "input": {"prompt": "p"}})
                path = "/vmodel/feed/{}"
            resp.raise_for_status()
            return path.format(resp.json()["id"])

        def poll(path: str) -> float:
            start = time.perf_counter()
            client.get(f"{url}{path}").raise_for_status()
            return time.perf_counter() - start

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(60)))  # warm: imports, pools, caches
            before, start = cpu_s(pid), time.perf_counter()
            paths = list(pool.map(create, range(n)))
            create_cpu, create_wall = cpu_s(pid) - before, time.perf_counter() - start
            before = cpu_s(pid)
            list(pool.map(poll, paths))
            poll_cpu = cpu_s(pid) - before
        levels = []
        for c in (1, 2, 4, 8, 16, 32):
            with ThreadPoolExecutor(c) as pool:
                start = time.perf_counter()
                took = list(pool.map(poll, (paths * 2)[: max(200, n)]))
                wall = time.perf_counter() - start
            p99 = round(pct(took, 0.99) * 1e3, 2)
            levels.append({"clients": c, "per_s": round(len(took) / wall, 1), "p99_ms": p99})
    time.sleep(2)
    before = cpu_s(pid)
    time.sleep(10)
    idle = (cpu_s(pid) - before) / 10

    def best(bound_ms: float) -> float:
        return max((lv["per_s"] for lv in levels if lv["p99_ms"] <= bound_ms), default=0.0)

    return {
        "create_cpu_ms": round(create_cpu * 1000 / n, 3),
        "create_per_s": round(n / create_wall, 1),
        "poll_cpu_ms": round(poll_cpu * 1000 / n, 3),
        "polls_per_s_p99_10ms": best(10),
        "polls_per_s_p99_50ms": best(50),
        "poll_levels": levels,
        "idle_cpu_ms_per_s": round(idle * 1000, 2),
    }


def hop(fake: str, routes: dict[str, tuple[str, dict[str, str], int | None]], n: int, warm: int) -> dict[str, Any]:
    """c=1, the routes interleaved (the order rotates), each request answered in full; per format."""
    out: dict[str, Any] = {}
    with httpx.Client(timeout=60) as client:
        for fmt in ("b64_json", "url"):
            times: dict[str, list[float]] = {name: [] for name in routes}
            answered = dict.fromkeys(routes, fmt)
            cpu: dict[str, float] = {}
            names = list(routes)
            for i in range(warm + n):
                if i == warm:
                    cpu = {name: cpu_s(pid) for name, (_, _, pid) in routes.items() if pid}
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    base, headers, _ = routes[name]
                    body = {"model": ROUTED, "prompt": f"a lighthouse {i}", "size": "256x256", "response_format": fmt}
                    start = time.perf_counter()
                    resp = client.post(f"{base}/v1/images/generations", json=body, headers=headers)
                    resp.raise_for_status()
                    if fmt == "url":
                        item = resp.json()["data"][0]
                        if item.get("url"):
                            client.get(item["url"], headers=headers).raise_for_status()
                        elif not item.get("b64_json"):
                            raise SystemExit(f"{name} answered neither url nor b64_json: {str(item)[:200]}")
                        else:  # LiteLLM drops response_format for openai/... models: it answers b64_json
                            answered[name] = "b64_json"
                    if i >= warm:
                        times[name].append(time.perf_counter() - start)
            direct = times["direct"]
            row: dict[str, Any] = {}
            for name, xs in times.items():
                row[name] = {"p50_ms": round(pct(xs, 0.5) * 1e3, 2), "p99_ms": round(pct(xs, 0.99) * 1e3, 2)}
                row[name]["answered"] = answered[name]
                if name != "direct":
                    row[name]["added_p50_ms"] = round((pct(xs, 0.5) - pct(direct, 0.5)) * 1e3, 2)
                    row[name]["added_p99_ms"] = round((pct(xs, 0.99) - pct(direct, 0.99)) * 1e3, 2)
                pid = routes[name][2]
                if pid:
                    row[name]["cpu_ms_per_request"] = round((cpu_s(pid) - cpu[name]) * 1000 / n, 2)
            if "litellm" in row:
                for name in ("fluxserve", "fluxserve_unmarked"):
                    row[f"{name}_vs_litellm_added_p50"] = round(
                        row[name]["added_p50_ms"] / max(row["litellm"]["added_p50_ms"], 0.01), 3
                    )
            out[fmt] = row
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from tests.support.pg import cluster, new_database

    fake = FakeOpenAI()
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    config = work / "fluxserve.toml"
    config.write_text(fluxserve_config(fake.url))
    os.environ.update({"FAKE_KEY": "sk-fake", "FLUXSERVE_RPM_PER_KEY": "0", "FLUXSERVE_MAX_QUEUED_PER_KEY": "0"})
    report: dict[str, Any] = {}

    (work / "sqlite").mkdir()
    port = free_port()
    proc = start_server(work / "sqlite" / "data", port, "--upstream-config", str(config))
    url = f"http://127.0.0.1:{port}"
    # The same relay with provenance off: what the hop costs without marking (LiteLLM marks nothing).
    (work / "unmarked").mkdir()
    port2 = free_port()
    unmarked = start_server(work / "unmarked" / "data", port2, "--upstream-config", str(config), "--provenance", "off")
    try:
        routes: dict[str, tuple[str, dict[str, str], int | None]] = {
            "direct": (fake.url, {}, None),
            "fluxserve": (url, AUTH, proc.pid),
            "fluxserve_unmarked": (f"http://127.0.0.1:{port2}", AUTH, unmarked.pid),
        }
        litellm = None
        if args.litellm:
            litellm = start_litellm(args.litellm, fake.url, work)
            routes["litellm"] = (litellm.url, {"Authorization": f"Bearer {LITELLM_KEY}"}, litellm.pid)  # type: ignore[attr-defined]
            time.sleep(2)
            before = cpu_s(litellm.pid)
            time.sleep(10)
            report["litellm_idle_cpu_ms_per_s"] = round((cpu_s(litellm.pid) - before) * 100, 2)
        try:
            report["hop"] = hop(fake.url, routes, args.hops, 20)
        finally:
            if litellm is not None:
                litellm.terminate()
                litellm.wait(30)
            unmarked.terminate()
            unmarked.wait(60)
        httpx.post(f"{url}/sleep", headers=AUTH, timeout=30).raise_for_status()  # jobs stay queued
        report["sqlite_serve"] = edge(url, proc.pid, args.requests, 8)
    finally:
        proc.terminate()
        proc.wait(60)

    with cluster() as server:
        db = new_database(server).replace("postgresql+psycopg://", "postgresql://")
        subprocess.run([FLUXSERVE, "db", "upgrade", "--database", db], check=True, capture_output=True)
        (work / "pg").mkdir()
        port = free_port()
        storage = f"file://{work / 'pg-storage'}"
        extra = ("--database", db, "--api-only", "--storage", storage, "--upstream-config", str(config))
        proc = start_server(work / "pg" / "data", port, *extra)
        try:
            report["postgres_api_only"] = edge(f"http://127.0.0.1:{port}", proc.pid, args.requests, 8)
        finally:
            proc.terminate()
            proc.wait(60)
    fake.shutdown()
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hops", type=int, default=200)
    parser.add_argument("--requests", type=int, default=1000)
    default_litellm = Path(__file__).with_name(".venv-litellm") / "bin" / "litellm"
    parser.add_argument("--litellm", default=str(default_litellm) if default_litellm.exists() else None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.environ.get("FLUXSERVE_BENCH_NETNS") != "1" and shutil.which("unshare"):
        # Loopback only: nothing started here reaches past this machine (LiteLLM's cost map fetch included).
        inner = f"ip link set lo up && exec {sys.executable} {' '.join(map(str, sys.argv))}"
        env = {**os.environ, "FLUXSERVE_BENCH_NETNS": "1"}
        raise SystemExit(subprocess.run(["unshare", "-n", "sh", "-c", inner], env=env).returncode)
    with tempfile.TemporaryDirectory() as tmp:
        report = {"machine": os.uname().nodename, "cpus": os.cpu_count(), **run(args, Path(tmp))}
    report["goal"] = {"create_cpu_ms": 3.0, "poll_cpu_ms": 1.0, "hop_added_p50_ms": 5.0, "hop_added_p99_ms": 10.0}
    report["goal"] |= {"idle_cpu_ms_per_s": 5.0}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
