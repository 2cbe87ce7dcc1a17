"""Hardening round 4: what real clients and an audit found (issue 35). Each test fails on the code before it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.models import ModelRegistry
from fluxserve.settings import Settings
from tests.conftest import API_KEY, AUTH
from tests.support.fakes import FakeEngine
from tests.support.images_util import png_bytes
from tests.support.polling import wait_for


def test_files_take_metadata_as_a_file_part_as_replicate_js_sends_it(client: TestClient) -> None:
    """replicate-js 1.4's files.create: `content` and `metadata` are both file parts (the second a JSON Blob
    named "blob"); one file part was allowed, so every replicate-js upload was a 422 "Too many files"."""
    up = client.post(
        "/v1/files",
        files=[
            ("content", ("buffer_1", png_bytes((64, 64)), "application/octet-stream")),
            ("metadata", ("blob", b'{"purpose": "edit"}', "application/json")),
        ],
        headers=AUTH,
    )
    assert up.status_code == 201, up.text
    assert up.json()["metadata"] == {"purpose": "edit"}
    three = client.post(
        "/v1/files",
        files=[("content", ("a", b"x", "image/png")), ("metadata", ("b", b"{}")), ("extra", ("c", b"x"))],
        headers=AUTH,
    )
    assert three.status_code in (400, 422) and three.status_code != 500


def test_files_refuse_deep_metadata_and_types_that_would_break_the_download(client: TestClient) -> None:
    deep = client.post(
        "/v1/files", files={"content": ("a", b"x", "image/png")}, data={"metadata": "[" * 5000}, headers=AUTH
    )
    assert deep.status_code == 422 and "metadata" in deep.text
    big = client.post(
        "/v1/files",
        files={"content": ("a", b"x", "image/png")},
        data={"metadata": '{"k": "' + "x" * 9000 + '"}'},
        headers=AUTH,
    )
    assert big.status_code == 422 and "8 KB" in big.text
    crlf = client.post(
        "/v1/files",
        files={"content": ("a", b"x", "image/png")},
        data={"type": "image/png\r\nSet-Cookie: a=b"},
        headers=AUTH,
    )
    assert crlf.status_code == 422 and "type" in crlf.text
    ok = client.post(
        "/v1/files", files={"content": ("a", b"x", "image/png")}, data={"type": "image/png; q=1"}, headers=AUTH
    )
    assert ok.status_code == 201, ok.text
    assert client.get(f"/v1/files/{ok.json()['id']}/download", headers=AUTH).headers["content-type"] == (
        "image/png; q=1"
    )


def test_a_blocking_create_not_done_when_its_wait_ends_says_starting(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    """replicate-python's run(wait=N) polls on only for "starting" (replicate.com's answer then) and returned
    None for "processing" (tests/e2e/test_async_clients.py drives the client itself)."""
    fake_engine.step_s = 0.1  # flux-dev's 28 steps: about 3 s
    created = client.post(
        "/v1/models/black-forest-labs/flux-dev/predictions",
        json={"input": {"prompt": "slower than the wait"}},
        headers={**AUTH, "Prefer": "wait=1"},
    )
    assert created.status_code == 201 and created.json()["status"] == "starting", created.json()["status"]
    done = client.post(
        "/v1/models/black-forest-labs/flux-schnell/predictions",
        json={"input": {"prompt": "quick"}},
        headers={**AUTH, "Prefer": "wait=10"},
    )
    assert done.json()["status"] == "succeeded"


def test_replicate_ignores_unknown_input_fields_and_still_checks_known_ones(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    """@ai-sdk/replicate sends `size` and `num_outputs` to every model; replicate.com's cog ignores fields a
    model does not have, and so does this dialect now (a 422 before). Known fields are checked as before."""
    sdk = client.post(
        "/v1/models/black-forest-labs/flux-kontext-pro/predictions",
        json={"input": {"prompt": "p", "size": "1024x1024", "num_outputs": 1, "aspect_ratio": "1:1"}},
        headers={**AUTH, "Prefer": "wait=10"},
    )
    assert sdk.status_code == 201 and sdk.json()["status"] == "succeeded", sdk.text
    assert (fake_engine.last_spec.width, fake_engine.last_spec.height) == (1024, 1024)
    pro = client.post(
        "/v1/models/black-forest-labs/flux-2-pro/predictions",
        json={"input": {"prompt": "p", "steps": 10}},  # hosted pro has no steps: ignored, not applied
        headers={**AUTH, "Prefer": "wait=10"},
    )
    assert pro.status_code == 201 and fake_engine.last_spec.steps != 10
    bad = client.post(
        "/v1/models/black-forest-labs/flux-kontext-pro/predictions",
        json={"input": {"prompt": "p", "size": "whatever", "aspect_ratio": "7:3"}},
        headers=AUTH,
    )
    assert bad.status_code == 422 and bad.json()["invalid_fields"][0]["field"].startswith("input.aspect_ratio")


def test_gpt_image_names_answer_b64_json_unless_asked_otherwise(
    settings: Settings, fake_engine: FakeEngine, tmp_path: Path
) -> None:
    """OpenAI answers gpt-image models with b64_json only; the AI SDK's OpenAI provider reads that field and
    found none when an alias answered URLs."""
    config = tmp_path / "models.toml"
    config.write_text('[aliases]\n"gpt-image-1" = "flux-schnell"\n"dall-e-3" = "flux-schnell"\n')
    with TestClient(create_app(settings.model_copy(update={"model_config_file": config}), engine=fake_engine)) as c:
        gpt = c.post("/v1/images/generations", json={"prompt": "p", "model": "gpt-image-1"}, headers=AUTH).json()
        assert gpt["data"][0].get("b64_json") and not gpt["data"][0].get("url"), gpt
        dalle = c.post("/v1/images/generations", json={"prompt": "p", "model": "dall-e-3"}, headers=AUTH).json()
        assert dalle["data"][0].get("url") and not dalle["data"][0].get("b64_json")
        asked = {"prompt": "p", "model": "gpt-image-1", "response_format": "url"}
        assert c.post("/v1/images/generations", json=asked, headers=AUTH).json()["data"][0].get("url")
        edit = c.post(
            "/v1/images/edits",
            files={"image": ("a.png", png_bytes((64, 64)), "image/png")},
            data={"prompt": "p", "model": "gpt-image-1", "size": "256x256"},
            headers=AUTH,
        )
        assert edit.status_code == 200, edit.text
        assert edit.json()["data"][0].get("b64_json")


def test_a1111_model_list_shows_names_not_paths_on_the_servers_disk(
    settings: Settings, fake_engine: FakeEngine
) -> None:
    import base64

    weights = str(settings.data_dir / "secret-models" / "flux-dev")
    registry_toml = settings.data_dir / "models.toml"
    registry_toml.parent.mkdir(parents=True, exist_ok=True)
    registry_toml.write_text(f'[models.flux-dev]\nweights = "{weights}"\n')
    basic = {"Authorization": "Basic " + base64.b64encode(f"u:{API_KEY}".encode()).decode()}
    with TestClient(
        create_app(settings.model_copy(update={"model_config_file": registry_toml}), engine=fake_engine)
    ) as c:
        listed = c.get("/sdapi/v1/sd-models", headers=basic)
        assert listed.status_code == 200
        assert "secret-models" not in listed.text
        assert {"title": "flux-dev", "filename": "flux-dev"}.items() <= next(
            m for m in listed.json() if m["title"] == "flux-dev"
        ).items()


def test_a1111_keeps_only_the_override_setting_it_reads(client: TestClient) -> None:
    import base64

    basic = {"Authorization": "Basic " + base64.b64encode(f"u:{API_KEY}".encode()).decode()}
    big = {"sd_model_checkpoint": "flux-schnell", "sd_vae": "x" * 500_000, "CLIP_stop_at_last_layers": 2}
    done = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "override_settings": big}, headers=basic)
    assert done.status_code == 200, done.text
    services = client.app.state.services  # type: ignore[attr-defined]
    owner = services.auth.env_owner(API_KEY)
    [job] = services.store.list_jobs(owner, "a1111", before=None, limit=1)
    assert job.spec.model == "flux-schnell"
    assert job.request["override_settings"] == {
        "sd_model_checkpoint": "flux-schnell",
        "ignored": ["CLIP_stop_at_last_layers", "sd_vae"],
    }
    assert len(json.dumps(job.request)) < 10_000


def test_demo_applies_a_model_tables_defaults_and_says_what_it_does_not_apply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`serve --demo --model-config` dropped `steps` for demo names without a word."""
    path = tmp_path / "m.toml"
    path.write_text('[models.flux-dev]\nsteps = 12\nmax_steps = 20\nweights = "/elsewhere/flux-dev"\n')
    demo = ModelRegistry.demo(tmp_path / "demo")
    with caplog.at_level(logging.WARNING, logger="fluxserve.models.registry"):
        layered = demo.layered(path, demo_weights=True)
    dev = layered.get("flux-dev")
    assert (dev.default_steps, dev.max_steps) == (12, 20)
    assert dev.weights == demo.get("flux-dev").weights
    assert "[models.flux-dev] weights not applied" in caplog.text


def test_bfl_kontext_applies_width_and_height_instead_of_dropping_them(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    xkey = {"x-key": API_KEY}
    made = client.post("/v1/flux-kontext-pro", json={"prompt": "p", "width": 768, "height": 512}, headers=xkey)
    assert made.status_code == 200, made.text
    wait_for(lambda: len(fake_engine.calls), lambda n: n >= 1, interval=0.02)
    assert (fake_engine.last_spec.width, fake_engine.last_spec.height) == (768, 512)
    half = client.post("/v1/flux-kontext-pro", json={"prompt": "p", "width": 768}, headers=xkey)
    assert half.status_code == 422 and "height" in half.text
    # Beside an aspect ratio (LiteLLM sends both) the ratio wins: tests/api/test_bfl_api.py.
    odd = client.post("/v1/flux-kontext-pro", json={"prompt": "p", "width": 770, "height": 512}, headers=xkey)
    assert odd.status_code == 422 and "width" in odd.text


def test_a_webhook_host_that_resolves_slowly_is_refused_in_time_and_holds_up_no_one(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """T4-06: webhook DNS checks run on their own threads with a deadline: four creates whose webhook host
    hangs in the resolver neither wait past it nor make another request's file read wait."""
    import socket
    import threading
    import time

    real = socket.getaddrinfo

    def resolver(host: str, *args: object, **kwargs: object) -> object:
        if host == "slow.example":
            time.sleep(8)
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    made = client.post("/v1/images/generations", json={"prompt": "p", "size": "256x256"}, headers=AUTH)
    image_url = made.json()["data"][0]["url"]
    answers: list[tuple[int, float, dict[str, object]]] = []

    def create() -> None:
        t0 = time.monotonic()
        body = {"input": {"prompt": "p"}, "webhook": "https://slow.example/hook"}
        resp = client.post("/v1/models/black-forest-labs/flux-schnell/predictions", json=body, headers=AUTH)
        answers.append((resp.status_code, time.monotonic() - t0, resp.json()))

    creates = [threading.Thread(target=create) for _ in range(4)]
    for thread in creates:
        thread.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    assert client.get(image_url.removeprefix("http://testserver")).status_code == 200
    assert time.monotonic() - t0 < 2.0  # the slow pool is free
    for thread in creates:
        thread.join(30)
    assert len(answers) == 4
    for status, took, body in answers:
        assert status == 422 and took < 7.5, (status, took, body)
        assert "did not resolve within 5 s" in str(body["detail"]) and "webhook" in str(body)


def test_large_json_bodies_are_parsed_off_the_event_loop(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """T4-05: a body of megabytes (inline base64 images) is parsed on the slow-work threads, so /health and
    every other request keep being answered meanwhile; a small one is parsed where it arrives."""
    import threading

    import fluxserve.api.errors as errors

    threads: list[str] = []
    real = errors.parse_json

    def parse(*args: object) -> object:
        threads.append(threading.current_thread().name)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(errors, "parse_json", parse)
    small = {"input": {"prompt": "p"}}
    big = {"input": {"prompt": "p", "image": "data:image/png;base64," + "A" * (2 * 1024 * 1024)}}
    for body in (small, big):
        client.post("/v1/models/black-forest-labs/flux-schnell/predictions", json=body, headers=AUTH)
    assert len(threads) == 2
    assert not threads[0].startswith("fluxserve-io") and threads[1].startswith("fluxserve-io"), threads


def test_uploads_stay_within_a_per_key_quota_counted_in_usage(settings: Settings, fake_engine: FakeEngine) -> None:
    """/v1/files was outside every quota (any number of 50 MB files for 7 days); each key now keeps at most
    so many files and bytes, shown in /v1/usage; deleting one makes room."""
    quota = settings.model_copy(update={"files_per_key": 2, "file_bytes_per_key": "100KiB"})
    with TestClient(create_app(quota, engine=fake_engine)) as c:

        def upload(size: int) -> httpx.Response:
            return c.post("/v1/files", files={"content": ("a.bin", b"x" * size, "image/png")}, headers=AUTH)

        first = upload(60 * 1024)
        assert first.status_code == 201, first.text
        too_big = upload(50 * 1024)
        assert too_big.status_code == 403, too_big.text
        detail = too_big.json()
        assert "60 KiB of 100 KiB" in json.dumps(detail) and "DELETE /v1/files" in json.dumps(detail), detail
        assert upload(10 * 1024).status_code == 201
        third = upload(1)
        assert third.status_code == 403 and "2 of 2 files" in third.text
        usage = c.get("/v1/usage", headers=AUTH).json()["files"]
        assert usage == {"count": 2, "bytes": 70 * 1024, "max_count": 2, "max_bytes": 100 * 1024}, usage
        assert c.delete(f"/v1/files/{first.json()['id']}", headers=AUTH).status_code == 204
        assert upload(50 * 1024).status_code == 201


@pytest.mark.parametrize(
    ("code", "status", "error_type"),
    [
        ("upstream_rejected", 400, "invalid_request_error"),
        ("upstream_account_error", 502, "server_error"),
        (None, 500, "server_error"),
    ],
)
def test_a_failed_job_answers_synchronous_dialects_by_why_it_failed(
    code: str | None, status: int, error_type: str
) -> None:
    """A provider's moderation refusal under A1111 (and fal's sync mode) was a 500: the client's request was
    refused, so a 4xx with the provider's words; an account problem is a 502; anything else a 500."""
    from dataclasses import replace

    from fluxserve.api.errors import http_status, job_failure
    from fluxserve.job import Job, Status

    spec = ModelRegistry.default().get("flux-pro").make_spec(prompt="p", width=256, height=256)
    job = Job(id="j", owner="o", dialect="a1111", spec=spec, request={})
    failed = replace(job, status=Status.FAILED, error="Content Moderated: nsfw", error_code=code)
    exc = job_failure(failed)
    assert http_status(exc) == (status, error_type) and exc.message == "Content Moderated: nsfw"
    assert "job_failure(job)" in (Path(__file__).parents[2] / "src/fluxserve/api/a1111.py").read_text()


def test_inputs_are_judged_as_they_arrive_and_fetching_stops_at_the_budget(
    settings: Settings, fake_engine: FakeEngine
) -> None:
    """One request fetched all of its up to 16 inputs (50 MB each) before the pixel budget was judged: now each
    is judged from its header as it arrives, and a request past the budget fetches nothing more."""
    import io
    from http.server import BaseHTTPRequestHandler

    from PIL import Image

    from tests.support.image_server import serve_loopback

    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, format="PNG")  # 36 MP of one colour: small to send
    bomb, fetched = buf.getvalue(), []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetched.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(bomb)))
            self.end_headers()
            self.wfile.write(bomb)

        def log_message(self, *args: object) -> None:
            pass

    with (
        serve_loopback(Handler) as base,
        TestClient(create_app(settings.model_copy(update={"allow_private_urls": True}), engine=fake_engine)) as c,
    ):
        urls = [f"{base}/{i}.png" for i in range(4)]
        got = c.post(
            "/v1/models/black-forest-labs/flux-2-pro/predictions",
            json={"input": {"prompt": "p", "input_images": urls}},
            headers=AUTH,
        )
    assert got.status_code == 422 and "72.0 so far" in got.text, got.text
    assert fetched == ["/0.png", "/1.png"]  # the third and fourth were never fetched


def test_one_keys_burst_waits_on_its_own_intake_slots() -> None:
    import asyncio

    from fluxserve.api.intake import IntakeSlots

    async def run() -> tuple[int, int, int]:
        slots = IntakeSlots(per_node=3, per_key=2)
        inside = {"a": 0, "b": 0}
        most = {"a": 0, "b": 0}

        async def gather(owner: str) -> None:
            async with slots.hold(owner):
                inside[owner] += 1
                most[owner] = max(most[owner], inside[owner])
                await asyncio.sleep(0.02)
                inside[owner] -= 1

        await asyncio.gather(*(gather("a") for _ in range(6)), *(gather("b") for _ in range(2)))
        return most["a"], most["b"], len(slots._keys)

    most_a, most_b, remembered = asyncio.run(run())
    assert most_a == 2 and most_b <= 2 and remembered == 0  # a key's burst holds two; none kept afterwards
