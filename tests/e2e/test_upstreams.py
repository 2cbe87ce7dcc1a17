"""Upstream providers: fluxserve A forwards hosted-only names to fluxserve B (a second real `serve --demo`
process speaking BFL's, Replicate's and OpenAI's APIs) and to a fal queue-API server, over real HTTP."""

from __future__ import annotations

import base64
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from fluxserve.outputs import read_metadata
from tests.support.fal_server import FalState, fal_server
from tests.support.images_util import png_bytes
from tests.support.polling import wait_for
from tests.support.provenance_util import c2pa_report
from tests.support.server import FLUXSERVE, RemoteServer

B_KEY = "fs-upstream-b-secret-key-0123456789"
FAL_KEY = "fal-secret-key-abcdef"
A_KEY = "fs-upstream-a-key"
LEASE = {"FLUXSERVE_LEASE_S": "2"}


def config(b: str, fal: str, *, dead: str = "http://127.0.0.1:9") -> str:
    common = "poll_interval_s = 0.2\nretry_base_s = 0.1\nretries = 1\nmax_in_flight = 8\ntimeout_s = 120\n"
    return f"""
[upstreams.bfl]
kind = "bfl"
base_url = "{b}"
api_key_env = "B_KEY"
{common}
[upstreams.rep]
kind = "replicate"
base_url = "{b}"
api_key_env = "B_KEY"
{common}
[upstreams.oai]
kind = "openai"
base_url = "{b}"
api_key_env = "B_KEY"
idempotent = true
{common}
[upstreams.fal]
kind = "fal"
base_url = "{fal}"
api_key_env = "FAL_KEY"
{common}
[upstreams.bfal]
kind = "fal"
base_url = "{b}"
api_key_env = "B_KEY"
{common}
[upstreams.typo]
kind = "bfl"
base_url = "{b}"
api_key_env = "B_KEY"
{common}
[upstreams.badkey]
kind = "openai"
base_url = "{b}/v1"
api_key_env = "WRONG_KEY"
idempotent = true
{common}
[upstreams.dead]
kind = "bfl"
base_url = "{dead}"
unhealthy_after = 1
cooldown_s = 60
{common}
[models.flux-pro]
upstream = "bfl"
upstream_model = "flux-pro-1.1"
price = 0.04

[models.flux-kontext-pro]
upstream = "rep"

[models.flux-2-pro]
upstream = "oai"

[models.flux-kontext-max]
upstream = "fal"
upstream_model = "fal-ai/flux-pro/kontext/max"

[models.flux-2-flex]
upstream = "bfal"
upstream_model = "fal-ai/flux-2-flex"

[models.flux-pro-typo]
upstream = "typo"
upstream_model = "no-such-endpoint"
price = 0.04

[models.flux-2-klein-9b]
upstream = "badkey"
fallback = ["oai"]

[models.flux-2-max]
upstream = "dead"
fallback = ["rep"]

[models.flux-dev]
spill_to = "bfl"
spill_after_s = 1
"""


@pytest.fixture(scope="module")
def b(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[RemoteServer]:
    with RemoteServer(tmp_path_factory.mktemp("b"), api_key=B_KEY, demo_model=demo_model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def fal() -> Iterator[tuple[str, FalState]]:
    state = FalState(key=FAL_KEY)
    with fal_server(state) as base:
        yield base, state


def start_a(data: Path, demo: Path, b: RemoteServer, fal_base: str, **kw: Any) -> RemoteServer:
    data.mkdir(parents=True, exist_ok=True)
    path = data / "upstreams.toml"
    path.write_text(config(b.url, fal_base))
    env = {"B_KEY": B_KEY, "FAL_KEY": FAL_KEY, "WRONG_KEY": "fs-not-a-key-of-b", **LEASE, **kw.pop("env", {})}
    return RemoteServer(
        data, api_key=A_KEY, demo_model=demo, env=env, extra_args=("--upstream-config", str(path)), **kw
    ).start()


@pytest.fixture(scope="module")
def a(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, b: RemoteServer, fal: tuple[str, FalState]
) -> Iterator[RemoteServer]:
    srv = start_a(tmp_path_factory.mktemp("a"), demo_model_dir, b, fal[0])
    yield srv
    srv.stop()


def auth(key: str = A_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def bfl_result(a: RemoteServer, endpoint: str, body: dict[str, Any], key: str = A_KEY) -> dict[str, Any]:
    created = httpx.post(f"{a.url}/v1/{endpoint}", json=body, headers={"x-key": key}, timeout=30)
    assert created.status_code == 200, created.text

    return bfl_wait(a, created.json()["id"], key)


def bfl_wait(a: RemoteServer, job_id: str, key: str = A_KEY, timeout: float = 90) -> dict[str, Any]:
    def probe() -> dict[str, Any]:
        return httpx.get(f"{a.url}/v1/get_result", params={"id": job_id}, headers={"x-key": key}).json()

    return wait_for(probe, lambda got: got["status"] != "Pending", timeout=timeout, interval=0.2)


def b_jobs(b: RemoteServer) -> list[tuple[str, str, str]]:
    with sqlite3.connect(b.data_dir / "fluxserve.db") as db:
        return db.execute("SELECT id, dialect, model FROM jobs ORDER BY created_at").fetchall()


def generated_url(a: RemoteServer, model: str, prompt: str, size: str = "256x256") -> str:
    body = {"model": model, "prompt": prompt, "size": size, "response_format": "url"}
    got = httpx.post(f"{a.url}/v1/images/generations", json=body, headers=auth(), timeout=90)
    assert got.status_code == 200, got.text
    return str(got.json()["data"][0]["url"])


def image_meta(url: str) -> dict[str, object]:
    got = httpx.get(url, timeout=30)
    assert got.status_code == 200
    return read_metadata(got.content)


def test_bfl_upstream_serves_flux_pro_and_the_image_is_ours(a: RemoteServer, b: RemoteServer) -> None:
    before = len(b_jobs(b))
    result = bfl_result(a, "flux-pro-1.1", {"prompt": "a red fox", "width": 256, "height": 256, "seed": 7})
    assert result["status"] == "Ready", result
    sample = result["result"]["sample"]
    assert sample.startswith(a.url)  # copied into A's storage: A's signed URL, not B's
    meta = image_meta(sample)
    assert meta["upstream"] == "bfl" and meta["seed"] == 7
    jobs = b_jobs(b)[before:]
    assert [(d, m) for _, d, m in jobs] == [("bfl", "flux-pro")]


def test_models_list_says_where_each_name_runs(a: RemoteServer) -> None:
    data = {m["id"]: m for m in httpx.get(f"{a.url}/v1/models", headers=auth()).json()["data"]}
    assert data["flux-pro"]["served_by"] == {"where": "upstream", "upstream": "bfl", "fallback": []}
    assert data["flux-dev"]["served_by"] == {"where": "local", "spill_to": "bfl", "spill_after_s": 1}
    assert data["flux-schnell"]["served_by"] == {"where": "local"}
    assert data["flux-2-max"]["served_by"]["fallback"] == ["rep"]


def test_openai_sdk_over_an_openai_upstream(a: RemoteServer, b: RemoteServer) -> None:
    client = openai.OpenAI(base_url=f"{a.url}/v1", api_key=A_KEY, max_retries=0)
    got = client.images.generate(model="flux-2-pro", prompt="a lighthouse", size="256x256", response_format="url")
    assert got.data and got.data[0].url and got.data[0].url.startswith(a.url)
    assert image_meta(got.data[0].url)["upstream"] == "oai"
    assert b_jobs(b)[-1][1:] == ("openai", "flux-2-pro")
    # Provenance (issue 37): A's image is marked and signed by A, with B's signed answer as its parent.
    state, failures, manifest = c2pa_report(httpx.get(got.data[0].url, timeout=30).content)
    assert (state, failures) == ("Valid", ["signingCredential.untrusted"])
    [parent] = manifest["ingredients"]
    assert parent["relationship"] == "parentOf" and parent.get("active_manifest")


def test_replicate_upstream_with_a_reference_image(a: RemoteServer, b: RemoteServer) -> None:
    ref = "data:image/png;base64," + base64.b64encode(png_bytes((128, 128), (0, 90, 200))).decode()
    created = httpx.post(
        f"{a.url}/v1/models/black-forest-labs/flux-kontext-pro/predictions",
        json={"input": {"prompt": "make it night", "input_image": ref, "output_format": "png"}},
        headers={**auth(), "Prefer": "wait=60"},
        timeout=90,
    )
    assert created.status_code in (200, 201), created.text
    pred = created.json()
    assert pred["status"] == "succeeded", pred
    assert image_meta(pred["output"])["upstream"] == "rep"
    assert b_jobs(b)[-1][1:] == ("replicate", "flux-kontext-pro")


def test_fal_upstream_polls_the_queue(a: RemoteServer, fal: tuple[str, FalState]) -> None:
    _, state = fal
    assert image_meta(generated_url(a, "flux-kontext-max", "a castle", "320x256"))["upstream"] == "fal"
    [submit] = [s for s in state.submits if s["body"]["prompt"] == "a castle"]
    assert submit["path"] == "/fal-ai/flux-pro/kontext/max"
    assert submit["body"]["image_size"] == {"width": 320, "height": 256}
    assert state.polls[submit["id"]] >= 3  # IN_QUEUE, IN_PROGRESS, COMPLETED: it was polled, not assumed


def test_fluxserve_b_as_a_fal_upstream(a: RemoteServer, b: RemoteServer) -> None:
    # B's own fal queue dialect, polled by A's fal upstream worker: both sides of fal's shapes are ours.
    url = generated_url(a, "flux-2-flex", "fal both ways", "256x256")
    assert image_meta(url)["upstream"] == "bfal"
    assert b_jobs(b)[-1][1:] == ("fal", "flux-2-flex")


def _upstream_health(a: RemoteServer) -> dict[str, dict[str, Any]]:
    workers = httpx.get(f"{a.url}/health").json()["engine"]["workers"]
    return {w["upstream"]["name"]: w["upstream"] for w in workers if "upstream" in w}


def test_a_model_the_provider_does_not_know_is_a_provider_problem_asked_once(a: RemoteServer, b: RemoteServer) -> None:
    before = b.log().count("POST unmatched 404")
    got = typo_request(a, A_KEY)
    # B's 404 for the model: the operator's route is wrong, not the client's request (a 502, not a 400).
    assert got.status_code == 502, got.text
    err = got.json()["error"]
    assert err["code"] == "upstream_account_error" and err["type"] == "server_error", err
    assert "The upstream typo could not serve it" in err["message"] and "'no-such-endpoint'" in err["message"]
    assert b.log().count("POST unmatched 404") - before == 1  # asked once, not retried
    assert _upstream_health(a)["typo"]["healthy"] is False  # at once, not after unhealthy_after failures


def test_a_refused_key_marks_the_upstream_unhealthy_and_fails_over(a: RemoteServer, b: RemoteServer) -> None:
    made = httpx.post(
        f"{a.url}/v1/images/generations",
        json={"model": "flux-2-klein-9b", "prompt": "a key B does not know", "size": "256x256"},
        headers=auth(),
        timeout=90,
    )
    assert made.status_code == 200, made.text  # B's 401 to badkey, then the fallback oai served it
    assert _upstream_health(a)["badkey"]["healthy"] is False and _upstream_health(a)["oai"]["healthy"] is True
    assert 'fluxserve_upstream_healthy{upstream="badkey"} 0.0' in httpx.get(f"{a.url}/metrics").text


def typo_request(a: RemoteServer, key: str) -> httpx.Response:
    body = {"model": "flux-pro-typo", "prompt": "x", "size": "256x256"}
    return httpx.post(f"{a.url}/v1/images/generations", json=body, headers=auth(key), timeout=60)


def test_dead_upstream_fails_over_to_the_fallback(a: RemoteServer, b: RemoteServer) -> None:
    assert image_meta(generated_url(a, "flux-2-max", "failover"))["upstream"] == "rep"
    assert b_jobs(b)[-1][1:] == ("replicate", "flux-2-max")
    health = httpx.get(f"{a.url}/health").json()
    upstreams = {w["upstream"]["name"]: w["upstream"] for w in health["engine"]["workers"] if "upstream" in w}
    assert upstreams["dead"]["healthy"] is False and upstreams["rep"]["healthy"] is True
    metrics = httpx.get(f"{a.url}/metrics").text
    assert 'fluxserve_upstream_healthy{upstream="dead"} 0.0' in metrics
    assert 'fluxserve_upstream_healthy{upstream="rep"} 1.0' in metrics


def test_credits_pay_for_one_image_then_402(tmp_path: Path, demo_model_dir: Path, b: RemoteServer, fal: Any) -> None:
    data = tmp_path / "a"
    data.mkdir()
    made = subprocess.run(
        [FLUXSERVE, "keys", "create", "--name", "payg", "--data-dir", str(data)], capture_output=True, text=True
    )
    key = made.stdout.strip().splitlines()[-1]
    subprocess.run([FLUXSERVE, "keys", "update", "payg", "--credits", "0.05", "--data-dir", str(data)], check=True)
    srv = start_a(data, demo_model_dir, b, fal[0])
    try:
        # A priced job that fails upstream holds nothing afterwards: its 0.04 comes back.
        typo = typo_request(srv, key)
        assert typo.status_code == 502, typo.text
        assert httpx.get(f"{srv.url}/v1/usage", headers=auth(key)).json()["credits"] == pytest.approx(0.05)
        ok = httpx.post(
            f"{srv.url}/v1/images/generations",
            json={"model": "flux-pro", "prompt": "paid", "size": "256x256"},
            headers=auth(key),
            timeout=90,
        )
        assert ok.status_code == 200, ok.text
        refused = httpx.post(
            f"{srv.url}/v1/images/generations",
            json={"model": "flux-pro", "prompt": "unpaid", "size": "256x256"},
            headers=auth(key),
            timeout=30,
        )
        assert refused.status_code == 402, refused.text
        err = refused.json()["error"]
        assert err["type"] == "insufficient_quota" and "0.04" in err["message"]
        bfl = httpx.post(f"{srv.url}/v1/flux-pro-1.1", json={"prompt": "unpaid"}, headers={"x-key": key})
        assert bfl.status_code == 402 and "credits" in bfl.text  # the same refusal in BFL's shape
        usage = httpx.get(f"{srv.url}/v1/usage", headers=auth(key)).json()
        assert usage["credits"] == pytest.approx(0.01)
        assert sum(r["cost"] for r in usage["data"]) == pytest.approx(0.04)
        report = subprocess.run(
            [FLUXSERVE, "usage", "--data-dir", str(data), "--key", "payg"], capture_output=True, text=True, check=True
        )
        assert "0.04" in report.stdout
    finally:
        srv.stop()


def test_spill_over_sends_a_waiting_local_job_upstream(a: RemoteServer, b: RemoteServer) -> None:
    # A's one local worker is busy with a slow flux-dev job; the flux-dev job behind it spills after 1 s.
    slow = httpx.post(
        f"{a.url}/v1/models/black-forest-labs/flux-dev/predictions",
        json={"input": {"prompt": "slow", "num_outputs": 4, "num_inference_steps": 50}},
        headers=auth(),
        timeout=10,
    )
    assert slow.status_code == 201, slow.text
    before = len(b_jobs(b))
    created = httpx.post(
        f"{a.url}/v1/models/black-forest-labs/flux-dev/predictions",
        json={"input": {"prompt": "spill me", "output_format": "png", "num_inference_steps": 4}},
        headers={**auth(), "Prefer": "wait=60"},
        timeout=90,
    )
    pred = created.json()
    assert pred["status"] == "succeeded", pred["error"]
    assert image_meta(pred["output"][0])["upstream"] == "bfl"
    assert [(d, m) for _, d, m in b_jobs(b)[before:]] == [("bfl", "flux-dev")]
    assert httpx.get(slow.json()["urls"]["get"], headers=auth()).json()["status"] == "processing"  # still local


def test_upstream_key_never_leaks(a: RemoteServer) -> None:
    texts = [a.log(), httpx.get(f"{a.url}/health").text, httpx.get(f"{a.url}/metrics", headers=auth()).text]
    texts.append((a.data_dir / "fluxserve.db").read_bytes().decode("latin-1"))
    for text in texts:
        assert B_KEY not in text and FAL_KEY not in text


def test_kill9_mid_poll_resumes_the_same_upstream_task(
    tmp_path: Path, demo_model_dir: Path, b: RemoteServer, fal: tuple[str, FalState]
) -> None:
    data = tmp_path / "a"
    srv = start_a(data, demo_model_dir, b, fal[0])
    before = len(b_jobs(b))
    # Slow on B (1 MP, 40 steps on CPU): A is polling when it is killed.
    created = httpx.post(
        f"{srv.url}/v1/flux-pro-1.1",
        json={"prompt": "resume me", "width": 1024, "height": 1024},
        headers={"x-key": A_KEY},
    )
    job_id = created.json()["id"]

    def task_recorded() -> bool:
        with sqlite3.connect(data / "fluxserve.db") as db:
            rows = db.execute(
                "SELECT payload FROM job_events WHERE job_id = ? AND kind = 'upstream'", (job_id,)
            ).fetchall()
        return any('"phase": "task"' in r[0] for r in rows)

    wait_for(task_recorded, bool, timeout=60, interval=0.05)
    srv.kill9()
    with sqlite3.connect(data / "fluxserve.db") as db:
        assert db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] == "processing"
    again = RemoteServer(data, api_key=A_KEY, port=srv.port, env=srv.extra_env, extra_args=srv.extra_args).start()
    try:
        result = bfl_wait(again, job_id, timeout=120)
        assert result["status"] == "Ready", result
        assert [(d, m) for _, d, m in b_jobs(b)[before:]] == [("bfl", "flux-pro")]  # one upstream task
        with sqlite3.connect(data / "fluxserve.db") as db:
            attempts = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            submits = db.execute(
                "SELECT count(*) FROM job_events WHERE job_id = ? AND kind = 'upstream' "
                "AND payload LIKE '%submitting%'",
                (job_id,),
            ).fetchone()[0]
        assert attempts == 2 and submits == 1
    finally:
        again.stop()


def test_openai_stream_and_three_image_edit_over_an_upstream(a: RemoteServer, b: RemoteServer) -> None:
    client = openai.OpenAI(base_url=f"{a.url}/v1", api_key=A_KEY, max_retries=0)
    events = list(
        client.images.generate(model="flux-2-pro", prompt="streamed", size="256x256", stream=True, partial_images=2)
    )
    # An upstream sends no partial images: the stream has only its final event.
    assert [e.type for e in events] == ["image_generation.completed"]
    assert events[-1].b64_json
    refs = [png_bytes((128, 128), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    edited = client.images.edit(
        model="flux-2-pro", prompt="combine", image=[("a.png", r, "image/png") for r in refs], size="256x256"
    )
    assert edited.data and (edited.data[0].url or "").startswith(a.url)
    [(_, dialect, model)] = b_jobs(b)[-1:]
    assert (dialect, model) == ("openai", "flux-2-pro")
    with sqlite3.connect(b.data_dir / "fluxserve.db") as db:
        [(spec,)] = db.execute("SELECT spec FROM jobs ORDER BY created_at DESC LIMIT 1").fetchall()
    assert spec.count('"images"') == 1 and len(__import__("json").loads(spec)["images"]) == 3  # all three references


def test_cancel_reaches_the_upstream_task(a: RemoteServer, b: RemoteServer) -> None:
    created = httpx.post(
        f"{a.url}/v1/models/black-forest-labs/flux-kontext-pro/predictions",
        json={"input": {"prompt": "cancel me", "aspect_ratio": "1:1"}},
        headers=auth(),
    )
    assert created.status_code == 201, created.text
    pred = created.json()

    def b_status() -> str | None:
        with sqlite3.connect(b.data_dir / "fluxserve.db") as db:
            row = db.execute(
                "SELECT status FROM jobs WHERE dialect = 'replicate' AND request LIKE '%cancel me%'"
            ).fetchone()
        return row[0] if row else None

    wait_for(b_status, lambda s: s is not None, timeout=30, interval=0.05)
    canceled = httpx.post(pred["urls"]["cancel"], headers=auth()).json()
    assert canceled["status"] in ("canceled", "processing")
    final = wait_for(
        lambda: httpx.get(pred["urls"]["get"], headers=auth()).json(), lambda p: p["status"] == "canceled", timeout=30
    )
    assert final["error"] is None or "cancel" in str(final["error"])
    assert wait_for(b_status, lambda s: s in ("canceled", "succeeded"), timeout=30) == "canceled"


def test_relay_task_api_over_an_upstream(a: RemoteServer) -> None:
    created = httpx.post(
        f"{a.url}/vmodel/generate",
        json={"model": "flux-pro", "input": {"prompt": "空气", "aspect_ratio": "1:1", "output_format": "jpg"}},
        headers=auth(),
    )
    assert created.status_code == 200, created.text
    feed = wait_for(
        lambda: httpx.get(f"{a.url}/vmodel/feed/{created.json()['id']}", headers=auth()).json(),
        lambda f: f["status"] in ("succeeded", "failed"),
        timeout=90,
        interval=0.2,
    )
    assert feed["status"] == "succeeded", feed
    assert image_meta(feed["output"][0])["upstream"] == "bfl"
