"""Upstream providers below the HTTP layer: config validation, each kind's request shape, failure mapping,
credits held and refunded exactly once, spill-over and failover as fenced transitions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from fluxserve.errors import InvalidInput, PaymentRequired
from fluxserve.job import EventKind, Status
from fluxserve.jobs import JobService
from fluxserve.migrations import open_store
from fluxserve.models import ModelRegistry
from fluxserve.models.upstreams import parse_upstreams
from fluxserve.store.credits import hold
from fluxserve.upstream.base import AccountError, Inputs, Rejected, Unavailable, call
from fluxserve.upstream.bfl import BFL
from fluxserve.upstream.fal import Fal
from fluxserve.upstream.health import Health
from fluxserve.upstream.openai import OpenAI
from fluxserve.upstream.replicate import Replicate
from fluxserve.upstream.routing import next_route

BASE = {"kind": "bfl", "base_url": "https://api.bfl.ai"}


def registry(tmp_path: Path, text: str) -> ModelRegistry:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return ModelRegistry.default().layered(path)


UPSTREAMS = """
[upstreams.bfl]
kind = "bfl"
base_url = "https://api.bfl.ai/"
api_key_env = "BFL_API_KEY"
price = 0.05
[upstreams.rep]
kind = "replicate"
base_url = "https://api.replicate.com"
[models.flux-pro]
upstream = "bfl"
upstream_model = "flux-pro-1.1"
fallback = ["rep"]
[models.flux-dev]
spill_to = "rep"
spill_after_s = 0
price_per_mp = 0.01
"""


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({**BASE, "kind": "midjourney"}, "kind must be one of bfl, replicate, fal, openai"),
        ({**BASE, "base_url": "ftp://x"}, "base_url must be an http(s) URL"),
        ({**BASE, "api_key": "sk-123"}, "unknown keys ['api_key']"),
        ({**BASE, "max_in_flight": 0}, "max_in_flight >= 1"),
        ({**BASE, "timeout": 3}, "unknown keys ['timeout']"),
    ],
)
def test_bad_upstream_tables_are_start_up_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_upstreams({"x": table}, "f.toml")


def test_models_route_only_to_configured_upstreams(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"names upstreams that are not configured: \['bfl'\]"):
        registry(tmp_path, '[models.flux-pro]\nupstream = "bfl"\n')
    with pytest.raises(ValueError, match="spill_to is for local models"):
        registry(tmp_path, UPSTREAMS + '[models.flux-kontext-pro]\nupstream = "bfl"\nspill_to = "rep"\n')


def test_registry_routes_prices_and_the_local_subset(tmp_path: Path) -> None:
    reg = registry(tmp_path, UPSTREAMS)
    assert reg.upstreams["bfl"].base_url == "https://api.bfl.ai"  # trailing slash dropped
    assert "flux-pro" not in reg.local().names and "flux-dev" in reg.local().names
    assert set(reg.routed_to("rep")) == {"flux-pro", "flux-dev"}  # fallback and spill
    assert reg.upstream_model("flux-pro", "bfl") == "flux-pro-1.1"
    assert reg.upstream_model("flux-pro", "rep") == "flux-pro"  # a fallback knows it by its own name
    pro = reg.get("flux-pro").make_spec(prompt="p", width=1024, height=1024, num_images=2)
    assert reg.cost(pro) == pytest.approx(0.10)  # the upstream's per-image price
    dev = reg.get("flux-dev").make_spec(prompt="p", width=1024, height=1024)
    assert reg.cost(dev) == pytest.approx(0.010486)  # per megapixel, to 6 places
    assert reg.get("flux-pro").facts()["served_by"] == {"where": "upstream", "upstream": "bfl", "fallback": ["rep"]}


def test_demo_registry_takes_routes_but_keeps_demo_weights(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(UPSTREAMS + '[models.flux-dev2]\nweights = "/somewhere"\n')
    reg = ModelRegistry.demo(tmp_path / "demo").layered(path, demo_weights=True)
    assert reg.get("flux-pro").upstream == "bfl"
    assert reg.get("flux-dev").weights == ModelRegistry.demo(tmp_path / "demo").get("flux-dev").weights


def _spec(**kw: object):  # type: ignore[no-untyped-def]
    fields = {"prompt": "a fox", "width": 512, "height": 768, "seed": 3, **kw}
    return ModelRegistry.default().get("flux-kontext-pro").make_spec(**fields)  # type: ignore[arg-type]


def _capture() -> tuple[list[httpx.Request], httpx.Client]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path.startswith("/v1/get_result"):
            return httpx.Response(200, json={"status": "Content Moderated", "details": {"reason": "nsfw"}})
        if "predictions" in path:
            return httpx.Response(201, json={"id": "p1", "status": "starting"})
        if path.startswith("/fal-ai"):
            return httpx.Response(200, json={"request_id": "r1", "status_url": "https://evil.example/steal"})
        return httpx.Response(200, json={"id": "t1", "polling_url": "http://169.254.169.254/latest"})

    return seen, httpx.Client(transport=httpx.MockTransport(handler))


def _config(kind: str) -> object:
    return parse_upstreams({"u": {"kind": kind, "base_url": "https://up.example"}}, "t")["u"]


def test_bfl_shape_references_and_polling_stays_on_its_host() -> None:
    seen, client = _capture()
    bfl = BFL(_config("bfl"))  # type: ignore[arg-type]
    task = bfl.submit(
        client, _spec(), "flux-kontext-max", Inputs([b"\x89PNG1", b"\x89PNG2"]), "k", idempotency_key="j-0"
    )
    body = json.loads(seen[0].content)
    assert seen[0].url.path == "/v1/flux-kontext-max" and seen[0].headers["x-key"] == "k"
    assert seen[0].headers["idempotency-key"] == "j-0"
    assert {"input_image", "input_image_2"} <= set(body) and body["aspect_ratio"] == "2:3"
    assert body["seed"] == 3 and body["width"] == 512
    with pytest.raises(Rejected, match="Content Moderated"):
        bfl.poll(client, task, "k")
    assert seen[1].url.host == "up.example"  # the polling_url pointed at a metadata address: not followed


def test_replicate_and_fal_shapes() -> None:
    seen, client = _capture()
    rep = Replicate(_config("replicate"))  # type: ignore[arg-type]
    rep.submit(client, _spec(), "flux-kontext-pro", Inputs([b"\x89PNG"]), "k")
    sent = json.loads(seen[0].content)["input"]
    assert seen[0].url.path == "/v1/models/black-forest-labs/flux-kontext-pro/predictions"
    # The size asked for (512x768), as the nearest ratio Kontext takes, not the input's whatever it is.
    assert sent["input_image"].startswith("data:image/png;base64,") and sent["aspect_ratio"] == "2:3"
    odd = ModelRegistry.default().get("flux-kontext-pro").make_spec(prompt="p", width=880, height=1184)
    assert rep.build_input(odd, "flux-kontext-pro", Inputs([]))["aspect_ratio"] == "3:4"  # 55:74, nearest allowed
    dev = ModelRegistry.default().get("flux-dev").make_spec(prompt="p", width=1024, height=1024, num_images=2)
    built = rep.build_input(dev, "flux-dev", Inputs([]))
    assert built["num_outputs"] == 2 and built["num_inference_steps"] == 28 and built["guidance"] == 3.5
    assert rep.images_per_task(dev, "flux-dev") == 2 and rep.images_per_task(dev, "flux-pro") == 1
    fal = Fal(_config("fal"))  # type: ignore[arg-type]
    task = fal.submit(client, _spec(), "fal-ai/flux-pro/kontext", Inputs([b"\x89PNG"]), "fk")
    body = json.loads(seen[1].content)
    assert seen[1].headers["authorization"] == "Key fk" and body["image_size"] == {"width": 512, "height": 768}
    assert task.urls["status"] == "https://up.example/fal-ai/flux-pro/kontext/requests/r1/status"  # not evil.example


def test_failure_mapping_from_status_codes() -> None:
    def answer(status: int, body: object) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(status, json=body)))

    with pytest.raises(Rejected, match=r"^Prompt is not allowed$"):
        call(answer(400, {"error": {"message": "Prompt is not allowed"}}), "GET", "https://x/")
    with pytest.raises(Rejected, match="Invalid input"):
        call(answer(422, {"detail": "Invalid input"}), "GET", "https://x/")
    for status in (401, 402, 403):  # our key or account: the operator's problem, a 502 to the client
        with pytest.raises(AccountError, match=f"HTTP {status}: no"):
            call(answer(status, {"detail": "no"}), "GET", "https://x/")
    with pytest.raises(Rejected) as missing:
        call(answer(404, {"detail": "Not Found"}), "GET", "https://x/")
    assert missing.value.status == 404  # on a submit, the worker reads it as an unknown model
    for status in (429, 500, 503):
        with pytest.raises(Unavailable) as info:
            call(answer(status, {}), "GET", "https://x/")
        assert not info.value.maybe_sent

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow")

    with pytest.raises(Unavailable) as unsent:
        call(httpx.Client(transport=httpx.MockTransport(refuse)), "POST", "https://x/")
    assert unsent.value.maybe_sent is False  # never reached it: safe to send again
    with pytest.raises(Unavailable) as lost:
        call(httpx.Client(transport=httpx.MockTransport(drop)), "POST", "https://x/")
    assert lost.value.maybe_sent is True  # may have started a task: resent only where idempotent


def test_openai_upstream_edits_send_every_reference() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [{"b64_json": "aGk="}]})

    client = httpx.Client(transport=httpx.MockTransport(handler))
    done = OpenAI(_config("openai")).submit(client, _spec(), "m", Inputs([b"a", b"b", b"c"]), None)  # type: ignore[arg-type]
    assert done.blobs == [b"hi"]
    assert seen[0].url.path == "/v1/images/edits" and seen[0].content.count(b'name="image[]"') == 3


@pytest.mark.parametrize("base_url", ["https://up.example", "https://up.example/v1", "https://up.example/v1/"])
def test_openai_upstream_forwards_seed_steps_guidance_and_reports_the_seed_used(base_url: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [{"b64_json": "aGk=", "seed": 77}, {"b64_json": "aG8="}]})

    client = httpx.Client(transport=httpx.MockTransport(handler), timeout=httpx.Timeout(60.0, connect=10.0))
    config = parse_upstreams({"u": {"kind": "openai", "base_url": base_url}}, "t")["u"]
    spec = ModelRegistry.default().get("flux-dev").make_spec(prompt="p", width=512, height=512, seed=5, steps=9)
    done = OpenAI(config).submit(client, spec, "flux-dev", Inputs([]), None)
    assert seen[0].url.path == "/v1/images/generations"  # never /v1/v1
    sent = json.loads(seen[0].content)
    assert (sent["seed"], sent["steps"], sent["guidance"]) == (5, 9, spec.guidance)
    assert done.seeds == [77, None]  # what the upstream says it used, where it says
    assert seen[0].extensions["timeout"]["read"] == 60.0  # the client's default when no wait is given
    # OpenAI's own models refuse unknown parameters: none are sent to them. A generation may take as long as
    # the job may still wait (a fixed minute lost answers the provider had billed).
    OpenAI(config).submit(client, spec, "gpt-image-1", Inputs([]), None, wait_s=540.0)
    assert not {"seed", "steps", "guidance"} & set(json.loads(seen[1].content))
    assert seen[1].extensions["timeout"]["read"] == 540.0 and seen[1].extensions["timeout"]["connect"] == 10.0


def test_health_cools_down_after_consecutive_failures() -> None:
    health = Health(unhealthy_after=2, cooldown_s=60)
    health.failed()
    assert health.healthy
    health.failed()
    assert not health.healthy and health.view()["consecutive_failures"] == 2
    health.succeeded()
    assert health.healthy


def _jobs(tmp_path: Path, reg: ModelRegistry) -> JobService:
    return JobService(open_store(f"sqlite:///{tmp_path / 'db.sqlite'}"), registry=reg)


def test_credits_are_held_once_and_refunded_once(tmp_path: Path) -> None:
    reg = registry(tmp_path, UPSTREAMS)
    jobs = _jobs(tmp_path, reg)
    jobs.store.add_key("k1", "payg", "h" * 64, "fs-")
    jobs.store.set_key_credits("k1", 0.12)
    spec = reg.get("flux-pro").make_spec(prompt="p", width=512, height=512)
    first = jobs.submit_sync("k1", "openai", spec, {})
    second = jobs.submit_sync("k1", "openai", spec, {})
    assert first.route == "bfl" and first.cost == pytest.approx(0.05)
    with pytest.raises(PaymentRequired, match=r"costs 0\.05 credits"):
        jobs.submit_sync("k1", "openai", spec, {})
    assert jobs.store.key_credits("k1") == pytest.approx(0.02)
    jobs.cancel_sync(first.id, "k1")  # queued: canceled at once, refunded
    jobs.cancel_sync(first.id, "k1")  # again: nothing more comes back
    claimed = jobs.claim_id(second.id, "w")
    assert claimed is not None
    assert jobs.fail(claimed, "upstream said no", code="upstream_rejected")
    assert not jobs.fail(claimed, "twice")
    assert jobs.store.key_credits("k1") == pytest.approx(0.12)
    assert jobs.store.get_job(second.id).error_code == "upstream_rejected"  # type: ignore[union-attr]


PAID_SPILL = """
[upstreams.paid]
kind = "bfl"
base_url = "https://api.bfl.ai"
price = 0.05
[models.flux-schnell]
spill_to = "paid"
spill_after_s = 0
"""


def test_a_job_costs_the_price_of_the_route_that_runs_it(tmp_path: Path) -> None:
    reg = registry(tmp_path, PAID_SPILL)
    jobs = _jobs(tmp_path, reg)
    for key, credits in (("rich", 0.12), ("poor", 0.01)):
        jobs.store.add_key(key, key, key[0] * 64, "fs-")
        jobs.store.set_key_credits(key, credits)
    spec = reg.get("flux-schnell").make_spec(prompt="p", width=256, height=256)
    rich, poor = jobs.submit_sync("rich", "openai", spec, {}), jobs.submit_sync("poor", "openai", spec, {})
    assert rich.cost is None and jobs.store.key_credits("rich") == pytest.approx(0.12)  # free here
    # Spilled to a priced upstream: the key pays that price at the move; one that cannot stays local.
    assert jobs.spill() == 1
    moved = jobs.store.get_job(rich.id)
    assert moved is not None and moved.route == "paid" and moved.cost == pytest.approx(0.05)
    assert jobs.store.key_credits("rich") == pytest.approx(0.07)
    assert jobs.store.get_job(poor.id).route is None and jobs.store.key_credits("poor") == pytest.approx(0.01)  # type: ignore[union-attr]
    # Back from the upstream (it was down): free again, the difference given back, exactly once.
    claimed = jobs.claim_id(rich.id, "upstream-worker")
    assert claimed is not None and jobs.reroute(claimed, None, "spilled upstream paid: down")
    back = jobs.store.get_job(rich.id)
    assert back is not None and back.cost is None and jobs.store.key_credits("rich") == pytest.approx(0.12)
    local = jobs.claim_id(rich.id, "local")
    assert local is not None and jobs.fail(local, "broke")
    assert jobs.store.key_credits("rich") == pytest.approx(0.12)  # nothing held, nothing more given back


def test_a_job_made_while_its_key_was_not_metered_is_not_refunded_later(tmp_path: Path) -> None:
    reg = registry(tmp_path, UPSTREAMS)
    jobs = _jobs(tmp_path, reg)
    jobs.store.add_key("k1", "later", "h" * 64, "fs-")
    job = jobs.submit_sync("k1", "openai", reg.get("flux-pro").make_spec(prompt="p", width=256, height=256), {})
    assert jobs.store.get_job(job.id).cost is None  # type: ignore[union-attr]  # nothing was held
    jobs.store.set_key_credits("k1", 1.0)  # metering starts while it waits
    claimed = jobs.claim_id(job.id, "w")
    assert claimed is not None and jobs.fail(claimed, "upstream down")
    assert jobs.store.key_credits("k1") == pytest.approx(1.0)  # not "refunded" 0.05 it never paid


def test_concurrent_debits_never_overspend(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.add_key("k1", "payg", "h" * 64, "fs-")
    store.set_key_credits("k1", 0.2)
    paid: list[bool] = []
    job = SimpleNamespace(owner="k1", cost=0.04, spec=SimpleNamespace(model="flux-pro", num_images=1))

    def one() -> None:
        try:
            with store.transaction() as conn:
                hold(conn, job)  # type: ignore[arg-type]
            paid.append(True)
        except PaymentRequired as exc:
            assert exc.param == "credits" and "costs 0.04 credits" in exc.message
            paid.append(False)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert paid.count(True) == 5 and paid.count(False) == 7 and store.key_credits("k1") == pytest.approx(0.0, abs=1e-9)


def test_spill_moves_only_waiting_local_jobs_once_and_failover_follows_the_fallbacks(tmp_path: Path) -> None:
    reg = registry(tmp_path, UPSTREAMS)
    jobs = _jobs(tmp_path, reg)
    dev = reg.get("flux-dev").make_spec(prompt="p", width=256, height=256)
    waiting = jobs.submit_sync("o", "openai", dev, {})
    running = jobs.claim_id(jobs.submit_sync("o", "openai", dev, {}).id, "local")
    assert running is not None
    assert jobs.spill() == 1 and jobs.spill() == 0  # the second sweep finds nothing left to move
    moved = jobs.store.get_job(waiting.id)
    assert moved is not None and moved.route == "rep" and moved.status is Status.QUEUED
    assert [i for i, *_ in jobs.store.queued(10, route=None)] == []
    assert [i for i, *_ in jobs.store.queued(10, route="rep")] == [waiting.id]
    pro = jobs.submit_sync("o", "openai", reg.get("flux-pro").make_spec(prompt="p", width=256, height=256), {})
    claimed = jobs.claim_id(pro.id, "upstream-worker")
    assert claimed is not None and next_route(claimed, reg, jobs.events(claimed.id)) == "rep"
    assert jobs.reroute(claimed, "rep", "bfl down")
    again = jobs.store.get_job(pro.id)
    assert again is not None and again.route == "rep" and again.attempts == 0  # the attempt was given back
    on_rep = jobs.claim_id(pro.id, "upstream-worker")
    assert (
        on_rep is not None and next_route(on_rep, reg, jobs.events(on_rep.id)) is None
    )  # bfl and rep tried: none left
    kinds = [e.kind for e in jobs.store.events(pro.id)]
    assert kinds.count(EventKind.ROUTED) == 1


def test_jobs_an_upstream_cannot_honour_or_that_came_back_are_not_spilled(tmp_path: Path) -> None:
    from dataclasses import replace

    from fluxserve.spec import Adapter

    reg = registry(tmp_path, UPSTREAMS)
    jobs = _jobs(tmp_path, reg)
    dev = reg.get("flux-dev").make_spec(prompt="p", width=256, height=256)
    lora = replace(dev, loras=(Adapter("style.safetensors", "d" * 64, "/loras/style.safetensors", 0.8),))
    with_lora = jobs.submit_sync("o", "openai", lora, {})  # no provider takes our adapters: it waits here
    spilled = jobs.submit_sync("o", "openai", dev, {})
    assert jobs.spill() == 1
    assert jobs.store.get_job(with_lora.id).route is None  # type: ignore[union-attr]
    # The upstream was down: it came back to the local queue, and stays there however long it waits.
    on_rep = jobs.claim_id(spilled.id, "upstream-worker")
    assert on_rep is not None and jobs.reroute(on_rep, None, "spilled upstream rep: down")
    assert jobs.spill() == 0
    back = jobs.store.get_job(spilled.id)
    assert back is not None and back.route is None and back.status is Status.QUEUED and back.attempts == 0


def test_upstream_worker_imports_no_torch() -> None:
    code = (
        "import sys; from fluxserve.upstream.worker import UpstreamWorker; import fluxserve.app; "
        "import fluxserve.queue.pg.runner; assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_upstream_without_its_key_fails_its_jobs_clearly_never_leaves_them_queued(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from fluxserve.app import create_app
    from fluxserve.settings import Settings
    from tests.conftest import API_KEY, AUTH
    from tests.support.fakes import FakeEngine

    toml = tmp_path / "u.toml"
    toml.write_text(
        '[upstreams.bfl]\nkind = "bfl"\nbase_url = "https://api.bfl.ai"\napi_key_env = "FLUXSERVE_TEST_UNSET_KEY"\n'
        '[models.flux-pro]\nupstream = "bfl"\n'
    )
    settings = Settings(data_dir=tmp_path / "d", api_key=API_KEY, upstream_config_file=toml)
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        health = client.get("/health").json()
        assert "FLUXSERVE_TEST_UNSET_KEY is not set" in health["error"]
        got = client.post("/v1/images/generations", json={"model": "flux-pro", "prompt": "p"}, headers=AUTH)
        assert got.status_code == 500 and "bfl is not usable" in got.json()["error"]["message"]
        local = client.post("/v1/images/generations", json={"model": "flux-schnell", "prompt": "p"}, headers=AUTH)
        assert local.status_code == 200  # the device worker serves the local names meanwhile


def test_an_upstream_call_waits_as_long_as_the_job_may_still_wait() -> None:
    import time

    from fluxserve.upstream.worker import wait_s

    later = time.monotonic() + 600
    assert 599 < wait_s(SimpleNamespace(deadline=None), later) <= 600  # type: ignore[arg-type]
    assert 29 < wait_s(SimpleNamespace(deadline=time.time() + 30), later) <= 30  # type: ignore[arg-type]
    assert wait_s(SimpleNamespace(deadline=time.time() - 5), later) == 1.0  # type: ignore[arg-type]


def test_a_name_served_upstream_takes_no_more_references_than_its_routes_carry(tmp_path: Path) -> None:
    """The replicate kind sent only the first of 16 references Kontext advertised: a route's limit is now the
    name's, so the rest are refused at create (400 naming the limit) instead of dropped."""
    reg = registry(
        tmp_path,
        '[upstreams.rep]\nkind = "replicate"\nbase_url = "https://api.replicate.com"\n'
        '[upstreams.bfl]\nkind = "bfl"\nbase_url = "https://api.bfl.ai"\n'
        '[models.flux-kontext-pro]\nupstream = "rep"\n[models.flux-2-pro]\nupstream = "rep"\n'
        '[models.flux-kontext-max]\nupstream = "bfl"\nfallback = ["rep"]\n[models.flux-2-flex]\nupstream = "bfl"\n',
    )
    default = ModelRegistry.default()
    assert default.get("flux-kontext-pro").image_limit > 1  # what it takes locally
    assert reg.get("flux-kontext-pro").image_limit == 1 and reg.get("flux-2-pro").image_limit == 8
    assert reg.get("flux-kontext-max").image_limit == 1  # its fallback carries one
    assert reg.get("flux-2-flex").image_limit == default.get("flux-2-flex").image_limit  # BFL carries them all
    with pytest.raises(InvalidInput, match=r"flux-kontext-pro takes at most 1 input image\(s\); got 2"):
        reg.get("flux-kontext-pro").check_image_count(2, param="input_images")
