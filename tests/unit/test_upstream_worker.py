"""UpstreamWorker in-process: a real SQLite store, real files, and each provider kind answered by an httpx
MockTransport written from that provider's documented shapes. Resume, lost answers, failover, cancel."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxserve.job import EventKind, Job, Status
from fluxserve.jobs import JobService
from fluxserve.migrations import open_store
from fluxserve.models import ModelRegistry
from fluxserve.outputs import read_metadata
from fluxserve.storage import LocalStorage
from fluxserve.upstream.hooks import hook_secret, hook_url, signed_by
from fluxserve.upstream.worker import UpstreamWorker
from tests.support.images_util import png_bytes

UP = "https://up.example"


def _registry(tmp_path: Path, kind: str, **table: Any) -> ModelRegistry:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
    (tmp_path / "u.toml").write_text(
        f'[upstreams.up]\nkind = "{kind}"\nbase_url = "{UP}"\npoll_interval_s = 0.01\nretry_base_s = 0.01\n'
        f"retries = 1\n{extra}"
        f'[upstreams.other]\nkind = "bfl"\nbase_url = "https://other.example"\n'
        '[models.flux-pro]\nupstream = "up"\nfallback = ["other"]\n[models.flux-kontext-pro]\nupstream = "up"\n'
    )
    return ModelRegistry.default().layered(tmp_path / "u.toml")


class Upstream:
    """Records every request; ``routes`` maps (method, path) to a function of the request."""

    def __init__(self, routes: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]]) -> None:
        self.routes = routes
        self.seen: list[tuple[str, str]] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path))
        for (method, path), answer in self.routes.items():
            if request.method == method and request.url.path == path:
                return answer(request)
        return httpx.Response(404, json={"detail": "Not Found"})

    def count(self, method: str, path: str) -> int:
        return self.seen.count((method, path))


def _json(status: int, body: Any) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _: httpx.Response(status, json=body)


def _png(_: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=png_bytes((64, 64), (1, 2, 3)), headers={"content-type": "image/png"})


@pytest.fixture
def core(tmp_path: Path) -> Iterator[tuple[JobService, LocalStorage]]:
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    jobs = JobService(store, lease_s=5.0)
    yield jobs, LocalStorage(tmp_path / "files", b"s" * 32, "http://127.0.0.1:8123", 3600)
    jobs.close()
    store.close()


def _worker(core: tuple[JobService, LocalStorage], reg: ModelRegistry, up: Upstream) -> UpstreamWorker:
    jobs, storage = core
    jobs.registry = reg
    worker = UpstreamWorker(jobs, storage, reg, reg.upstreams["up"], transport=up.transport)
    assert worker.load()
    worker.start_heartbeat()
    return worker


def _job(jobs: JobService, model: str = "flux-pro", **kw: Any) -> Job:
    assert jobs.registry is not None
    spec = jobs.registry.get(model).make_spec(prompt="a fox", width=256, height=256, seed=5, **kw)
    return jobs.submit_sync("o", "openai", spec, {})


def _bfl(polls_pending: int = 1) -> Upstream:
    state = {"polls": 0}

    def poll(_: httpx.Request) -> httpx.Response:
        state["polls"] += 1
        if state["polls"] <= polls_pending:
            return httpx.Response(200, json={"id": "t1", "status": "Pending"})
        return httpx.Response(200, json={"id": "t1", "status": "Ready", "result": {"sample": f"{UP}/files/t1.png"}})

    return Upstream(
        {
            ("POST", "/v1/flux-pro"): _json(200, {"id": "t1", "polling_url": f"{UP}/v1/get_result?id=t1"}),
            ("GET", "/v1/get_result"): poll,
            ("GET", "/files/t1.png"): _png,
        }
    )


def test_bfl_task_submitted_once_polled_and_copied_into_our_storage(core: Any, tmp_path: Path) -> None:
    jobs, storage = core
    up = _bfl(polls_pending=2)
    worker = _worker(core, _registry(tmp_path, "bfl"), up)
    job = _job(jobs)
    assert [j.id for j in worker.run_claimed(job.id)] == [job.id]
    done = jobs.store.get_job(job.id)
    assert done is not None and done.status is Status.SUCCEEDED, done.error if done else None
    assert read_metadata(storage.read(done.outputs[0].key))["upstream"] == "up"
    # Asked for 256x256, answered 64x64: the job says what it got, and the dialects read that (Job.size).
    assert done.size == (64, 64) != (done.spec.width, done.spec.height)
    assert up.count("POST", "/v1/flux-pro") == 1 and up.count("GET", "/v1/get_result") == 3
    phases = [e.payload.get("phase") for e in jobs.store.events(job.id) if e.kind is EventKind.UPSTREAM]
    assert phases == ["submitting", "task"]
    assert worker.engine_info()["upstream"]["healthy"] is True
    worker.stop()


def test_an_idempotent_upstream_records_its_task_but_no_submitting_step(core: Any, tmp_path: Path) -> None:
    """What a resend after a lost answer would cost is nothing there (the same Idempotency-Key): no write
    before the submit, only the task a new attempt resumes."""
    jobs, _ = core
    up = _bfl(polls_pending=1)
    worker = _worker(core, _registry(tmp_path, "bfl", idempotent=True), up)
    job = _job(jobs)
    worker.run_claimed(job.id)
    assert jobs.store.get_job(job.id).status is Status.SUCCEEDED  # type: ignore[union-attr]
    phases = [e.payload.get("phase") for e in jobs.store.events(job.id) if e.kind is EventKind.UPSTREAM]
    assert phases == ["task"]
    worker.stop()


def _died_after(jobs: JobService, job: Job, *phases: dict[str, Any]) -> None:
    """An earlier attempt that wrote these upstream events and then lost its worker (lease expired)."""
    claimed = jobs.claim_id(job.id, "dead-worker")
    assert claimed is not None
    for p in phases:
        assert jobs.note_upstream(claimed, {"upstream": "up", **p})
    assert jobs.expire(now=jobs.store.now() + 60) == (0, 1, 0)


def test_a_new_attempt_resumes_the_recorded_task_without_submitting(core: Any, tmp_path: Path) -> None:
    jobs, _ = core
    up = _bfl()
    worker = _worker(core, _registry(tmp_path, "bfl"), up)
    job = _job(jobs)
    task = {"phase": "task", "index": 0, "task_id": "t1", "urls": {"poll": f"{UP}/v1/get_result?id=t1"}}
    _died_after(jobs, job, {"phase": "submitting", "index": 0}, task)
    worker.run_claimed(job.id)
    done = jobs.store.get_job(job.id)
    assert done is not None and done.status is Status.SUCCEEDED and done.attempts == 2
    assert up.count("POST", "/v1/flux-pro") == 0  # no second task: no second charge
    worker.stop()


def test_a_lost_submit_answer_is_not_resent_to_a_non_idempotent_upstream(core: Any, tmp_path: Path) -> None:
    jobs, _ = core
    up = _bfl()
    worker = _worker(core, _registry(tmp_path, "bfl"), up)
    job = _job(jobs)
    _died_after(jobs, job, {"phase": "submitting", "index": 0})
    worker.run_claimed(job.id)
    done = jobs.store.get_job(job.id)
    assert done is not None and done.status is Status.FAILED and "answer was lost" in (done.error or "")
    assert up.count("POST", "/v1/flux-pro") == 0
    worker.stop()


def test_a_stop_while_waiting_to_retry_an_unsent_submit_is_no_lost_answer(core: Any, tmp_path: Path) -> None:
    jobs, _ = core
    up = _bfl(polls_pending=0)
    worker = _worker(core, _registry(tmp_path, "bfl"), up)
    job = _job(jobs)
    # An earlier attempt's submit got a 503 (no task made), and it stopped during the backoff.
    _died_after(jobs, job, {"phase": "submitting", "index": 0}, {"phase": "unsent", "index": 0})
    worker.run_claimed(job.id)
    done = jobs.store.get_job(job.id)
    assert done is not None and done.status is Status.SUCCEEDED, done.error if done else None
    assert up.count("POST", "/v1/flux-pro") == 1
    worker.stop()


def test_polling_that_keeps_failing_cancels_the_task_before_failing_over(core: Any, tmp_path: Path) -> None:
    jobs, _ = core
    up = Upstream(
        {
            ("POST", "/v1/models/black-forest-labs/flux-pro/predictions"): _json(201, {"id": "p1"}),
            ("GET", "/v1/predictions/p1"): _json(503, {"detail": "busy"}),
            ("POST", "/v1/predictions/p1/cancel"): _json(200, {"id": "p1", "status": "canceled"}),
        }
    )
    worker = _worker(core, _registry(tmp_path, "replicate"), up)
    job = _job(jobs)
    worker.run_claimed(job.id)
    moved = jobs.store.get_job(job.id)
    assert moved is not None and moved.status is Status.QUEUED and moved.route == "other"
    # The first provider's task would otherwise run on, and be billed, beside the fallback's.
    assert up.count("POST", "/v1/predictions/p1/cancel") == 1
    worker.stop()


def test_an_idempotent_upstream_gets_the_lost_submit_again_with_the_same_key(core: Any, tmp_path: Path) -> None:
    jobs, _ = core
    keys: list[str] = []
    up = _bfl()
    post = up.routes[("POST", "/v1/flux-pro")]
    up.routes[("POST", "/v1/flux-pro")] = lambda r: (keys.append(r.headers["idempotency-key"]), post(r))[1]
    worker = _worker(core, _registry(tmp_path, "bfl", idempotent=True), up)
    job = _job(jobs)
    _died_after(jobs, job, {"phase": "submitting", "index": 0})
    worker.run_claimed(job.id)
    assert jobs.store.get_job(job.id).status is Status.SUCCEEDED  # type: ignore[union-attr]
    assert keys == [f"{job.id}-0"]
    worker.stop()


def test_5xx_retried_then_failed_over_4xx_failed_once(core: Any, tmp_path: Path) -> None:
    jobs, _ = core
    up = Upstream(
        {
            ("POST", "/v1/flux-pro"): _json(503, {"detail": "busy"}),
            ("POST", "/v1/flux-kontext-pro"): _json(400, {"detail": "Prompt refused"}),
        }
    )
    worker = _worker(core, _registry(tmp_path, "bfl"), up)
    pro = _job(jobs)
    worker.run_claimed(pro.id)
    moved = jobs.store.get_job(pro.id)
    assert moved is not None and moved.status is Status.QUEUED and moved.route == "other"
    assert up.count("POST", "/v1/flux-pro") == 2  # retries = 1
    kontext = _job(jobs, "flux-kontext-pro")
    worker.run_claimed(kontext.id)
    failed = jobs.store.get_job(kontext.id)
    assert failed is not None and failed.status is Status.FAILED and failed.error_code == "upstream_rejected"
    assert failed.error == "The upstream up refused the request: Prompt refused"
    assert up.count("POST", "/v1/flux-kontext-pro") == 1
    worker.stop()


def test_a_cancel_while_polling_cancels_the_upstream_prediction(core: Any, tmp_path: Path) -> None:
    jobs, _ = core
    holder: dict[str, Job] = {}

    def poll(_: httpx.Request) -> httpx.Response:
        jobs.cancel_sync(holder["job"].id, "o")  # the client cancels while the task runs upstream
        return httpx.Response(200, json={"id": "p1", "status": "processing"})

    up = Upstream(
        {
            ("POST", "/v1/models/black-forest-labs/flux-pro/predictions"): _json(201, {"id": "p1"}),
            ("GET", "/v1/predictions/p1"): poll,
            ("POST", "/v1/predictions/p1/cancel"): _json(200, {"id": "p1", "status": "canceled"}),
        }
    )
    worker = _worker(core, _registry(tmp_path, "replicate"), up)
    holder["job"] = _job(jobs)
    worker.run_claimed(holder["job"].id)
    assert jobs.store.get_job(holder["job"].id).status is Status.CANCELED  # type: ignore[union-attr]
    assert up.count("POST", "/v1/predictions/p1/cancel") == 1
    worker.stop()


def test_replicate_fal_and_openai_results(core: Any, tmp_path: Path) -> None:
    jobs, storage = core
    rep = Upstream(
        {
            ("POST", "/v1/models/black-forest-labs/flux-pro/predictions"): _json(201, {"id": "p1"}),
            ("GET", "/v1/predictions/p1"): _json(200, {"status": "succeeded", "output": f"{UP}/o.png"}),
            ("GET", "/o.png"): _png,
        }
    )
    fal_state = {"n": 0}

    def fal_status(_: httpx.Request) -> httpx.Response:
        fal_state["n"] += 1
        return httpx.Response(200, json={"status": "IN_PROGRESS" if fal_state["n"] == 1 else "COMPLETED"})

    fal = Upstream(
        {
            ("POST", "/fal-ai/flux-pro"): _json(200, {"request_id": "r1"}),
            ("GET", "/fal-ai/flux-pro/requests/r1/status"): fal_status,
            ("GET", "/fal-ai/flux-pro/requests/r1"): _json(200, {"images": [{"url": f"{UP}/f.png"}]}),
            ("GET", "/f.png"): _png,
        }
    )
    b64 = __import__("base64").b64encode(png_bytes((64, 64))).decode()
    oai = Upstream(
        {("POST", "/v1/images/generations"): lambda r: httpx.Response(200, json={"data": [{"b64_json": b64}]})}
    )
    for kind, up in (("replicate", rep), ("fal", fal), ("openai", oai)):
        sub = tmp_path / kind
        sub.mkdir()
        worker = _worker(core, _registry(sub, kind), up)
        job = _job(jobs, output_format="jpeg")
        worker.run_claimed(job.id)
        done = jobs.store.get_job(job.id)
        assert done is not None and done.status is Status.SUCCEEDED, (kind, done.error if done else None)
        assert storage.read(done.outputs[0].key)[:3] == b"\xff\xd8\xff"  # re-encoded as the job asked
        worker.stop()


@pytest.mark.parametrize(
    "answer",
    [["not", "an", "object"], {"data": [{"b64_json": "!!! not base64 !!!"}]}, {"data": ["a string, not an item"]}],
)
def test_a_malformed_answer_fails_the_job_at_once_saying_so(core: Any, tmp_path: Path, answer: Any) -> None:
    """T4-13: an answer of the wrong shape is the provider's fault, said as such, at once: not an exception
    that escapes the worker and leaves the job running until its lease runs out twice."""
    jobs, _ = core
    up = Upstream({("POST", "/v1/images/generations"): _json(200, answer)})
    worker = _worker(core, _registry(tmp_path, "openai"), up)
    job = _job(jobs)
    assert [j.id for j in worker.run_claimed(job.id)] == [job.id]
    failed = jobs.store.get_job(job.id)
    assert failed is not None and failed.status is Status.FAILED and failed.error_code == "upstream_malformed"
    assert failed.error is not None and failed.error.startswith("The upstream up gave an answer that could not be read")
    assert up.count("POST", "/v1/images/generations") == 1  # never sent twice, never failed over
    assert worker.engine_info()["upstream"]["consecutive_failures"] == 1
    worker.stop()


def test_a_redirect_from_the_upstreams_host_to_another_private_address_is_refused(core: Any, tmp_path: Path) -> None:
    jobs, _ = core
    up = _bfl(polls_pending=0)
    up.routes[("GET", "/files/t1.png")] = lambda _: httpx.Response(302, headers={"location": "http://10.0.0.5/x.png"})
    up.routes[("GET", "/x.png")] = _png  # an internal image: must never become an output
    worker = _worker(core, _registry(tmp_path, "bfl"), up)
    job = _job(jobs)
    worker.run_claimed(job.id)
    moved = jobs.store.get_job(job.id)
    # The exemption covers the upstream's own host only: the second hop is checked, refused, and the job fails
    # over as with any result that could not be fetched.
    assert moved is not None and moved.status is Status.QUEUED and moved.route == "other", moved
    assert up.count("GET", "/x.png") == 0
    worker.stop()


def test_the_api_key_follows_urls_on_the_providers_own_scheme_host_and_port_only(tmp_path: Path) -> None:
    from fluxserve.upstream.bfl import BFL

    provider = BFL(_registry(tmp_path, "bfl").upstreams["up"])
    assert provider.own_url(f"{UP}/v1/get_result?id=1", "d") == f"{UP}/v1/get_result?id=1"
    assert provider.own_url(f"{UP}:443/v1/get_result?id=1", "d") == f"{UP}:443/v1/get_result?id=1"
    for elsewhere in ("http://up.example/v1/get_result", "https://up.example:8443/x", "https://evil.example/x"):
        assert provider.own_url(elsewhere, "default") == "default", elsewhere


def test_a_spilled_job_whose_upstream_is_down_goes_back_to_the_local_queue(core: Any, tmp_path: Path) -> None:
    jobs, _ = core
    (tmp_path / "u.toml").write_text(
        f'[upstreams.up]\nkind = "bfl"\nbase_url = "{UP}"\nretry_base_s = 0.01\nretries = 1\n'
        '[models.flux-dev]\nspill_to = "up"\nspill_after_s = 0\n'
    )
    reg = ModelRegistry.default().layered(tmp_path / "u.toml")
    up = Upstream({("POST", "/v1/flux-dev"): _json(503, {"detail": "down"})})
    worker = _worker(core, reg, up)
    job = _job(jobs, "flux-dev")
    assert jobs.spill() == 1
    worker.run_claimed(job.id)
    back = jobs.store.get_job(job.id)
    # A local worker runs it: not failed because the upstream it was sent to as a favour is down.
    assert back is not None and back.status is Status.QUEUED and back.route is None, back
    assert up.count("POST", "/v1/flux-dev") == 2  # retries = 1
    assert jobs.spill() == 0  # and it is not sent there again
    worker.stop()


def test_bfls_webhook_wakes_the_polling_worker_at_once(core: Any, tmp_path: Path) -> None:
    """With --public-url, BFL gets a webhook URL and a per-task secret at submit; the webhook (here its wake-up)
    makes the worker poll now rather than after its 30 s interval. Without it, polling alone still ends it."""
    jobs, storage = core
    (tmp_path / "h.toml").write_text(
        f'[upstreams.up]\nkind = "bfl"\nbase_url = "{UP}"\npoll_interval_s = 30\n[models.flux-pro]\nupstream = "up"\n'
    )
    reg = ModelRegistry.default().layered(tmp_path / "h.toml")
    ready = threading.Event()
    sent: dict[str, Any] = {}

    def submit(request: httpx.Request) -> httpx.Response:
        sent.update(json.loads(request.content))
        return httpx.Response(200, json={"id": "t1", "polling_url": f"{UP}/v1/get_result?id=t1"})

    def poll(_: httpx.Request) -> httpx.Response:
        if not ready.is_set():
            return httpx.Response(200, json={"id": "t1", "status": "Pending"})
        return httpx.Response(200, json={"id": "t1", "status": "Ready", "result": {"sample": f"{UP}/files/t1.png"}})

    up = Upstream({("POST", "/v1/flux-pro"): submit, ("GET", "/v1/get_result"): poll, ("GET", "/files/t1.png"): _png})
    jobs.registry = reg
    secret = b"k" * 32
    worker = UpstreamWorker(jobs, storage, reg, reg.upstreams["up"], transport=up.transport, hooks=(UP, secret))
    assert worker.load()
    worker.start_heartbeat()
    job = _job(jobs)
    ran = threading.Thread(target=worker.run_claimed, args=(job.id,))
    ran.start()
    try:
        deadline = time.monotonic() + 10
        while up.count("GET", "/v1/get_result") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        ref = f"{job.id}-0"
        assert sent["webhook_url"] == hook_url(UP, "up", ref)
        assert sent["webhook_secret"] == hook_secret(secret, "up", ref)
        ready.set()
        t0 = time.monotonic()
        jobs.wake(job.id)  # what POST /v1/upstream-hooks/up/<ref> does once its signature checks out
        ran.join(10)
        assert not ran.is_alive() and time.monotonic() - t0 < 5  # not the 10 s a poll interval would take
    finally:
        worker.stop()
        ran.join(15)
    assert jobs.store.get_job(job.id).status is Status.SUCCEEDED  # type: ignore[union-attr]
    assert up.count("GET", "/v1/get_result") == 2
    body = b'{"id": "t1", "status": "Ready"}'
    good = "sha256=" + hmac.new(sent["webhook_secret"].encode(), body, hashlib.sha256).hexdigest()
    assert signed_by(sent["webhook_secret"], body, good) and not signed_by(sent["webhook_secret"], body + b" ", good)


def test_an_upstream_answer_flagged_by_our_safety_check_is_withheld(core: Any, tmp_path: Path) -> None:
    """Issue 37: with a classifier configured, a provider's image is checked here too: flagged, its job fails
    as content moderated and nothing is stored; relaxed within the operator's bound, it is delivered."""
    from fluxserve.engine.safety import FLAGGED_CODE, SafetyChecker
    from tests.support.safety_util import build_classifier

    jobs, storage = core
    model = build_classifier(tmp_path / "nsfw", 0.9)
    reg = _registry(tmp_path, "bfl")
    jobs.registry = reg
    checker = SafetyChecker(model, threshold=0.5, labels=["nsfw"], max_tolerance=6)
    up = _bfl(polls_pending=0)
    worker = UpstreamWorker(jobs, storage, reg, reg.upstreams["up"], transport=up.transport, safety=checker)
    assert worker.load()
    worker.start_heartbeat()
    flagged = _job(jobs)
    worker.run_claimed(flagged.id)
    done = jobs.store.get_job(flagged.id)
    assert done is not None and done.status is Status.FAILED and done.error_code == FLAGGED_CODE
    assert done.error and done.error.startswith("NSFW content detected") and not done.outputs
    relaxed = _job(jobs, safety_tolerance=6)
    worker.run_claimed(relaxed.id)
    done = jobs.store.get_job(relaxed.id)
    assert done is not None and done.status is Status.SUCCEEDED
    assert checker.counts[("flagged",)] == 1 and checker.counts[("skipped",)] == 1
    worker.stop()


def test_the_first_submit_after_a_claim_reads_no_row_and_a_later_one_sees_a_cancel(
    core: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim just read the job: its first submit stops for nothing a read would show, without the read
    (one store read fewer per relayed image). A retry reads the row after its backoff, and a cancel asked
    meanwhile stops it before a second send."""
    jobs, _ = core
    b64 = __import__("base64").b64encode(png_bytes((64, 64))).decode()
    answers = iter([httpx.Response(503, json={"error": {"message": "busy"}})])
    up = Upstream(
        {
            ("POST", "/v1/images/generations"): lambda _: next(
                answers, httpx.Response(200, json={"data": [{"b64_json": b64}]})
            )
        }
    )
    worker = _worker(core, _registry(tmp_path, "openai", idempotent=True), up)
    worker.config = dataclasses.replace(worker.config, retry_base_s=0.4)
    reads: list[str] = []
    real = jobs.store.get_job

    def counted(job_id: str, **kw: Any) -> Any:
        reads.append(job_id)
        return real(job_id, **kw)

    monkeypatch.setattr(jobs.store, "get_job", counted)
    ok = _job(jobs)
    first = threading.Thread(target=worker.run_claimed, args=(ok.id,))
    first.start()
    time.sleep(0.2)  # the first send was refused (503); the retry waits 0.4 s
    jobs.cancel_sync(ok.id, "o")
    first.join(10)
    reads_before_answer = reads.count(ok.id)
    done = real(ok.id)
    assert done is not None and done.status is Status.CANCELED, done
    assert up.count("POST", "/v1/images/generations") == 1  # the cancel was seen before a second send
    assert reads_before_answer >= 2  # cancel_sync's own reads, and the retry's check
    reads.clear()
    fresh = _job(jobs)
    worker.run_claimed(fresh.id)
    after = real(fresh.id)
    assert after is not None and after.status is Status.SUCCEEDED
    assert reads == []  # claimed, submitted, stored, completed: the row never read back
    worker.stop()
