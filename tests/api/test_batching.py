"""Compatible queued jobs share one pipeline call; a lone request never waits for company."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fluxserve.api.deps import Services
from fluxserve.app import create_app
from fluxserve.auth import hash_key
from fluxserve.engine.base import EngineRequest
from fluxserve.engine.flux import DiffusersEngine
from fluxserve.errors import OutOfMemory
from fluxserve.models import ModelRegistry
from fluxserve.settings import Settings
from tests.api.test_api import _wait_feed
from tests.conftest import API_KEY, AUTH
from tests.support.fakes import FakeEngine


def _submit(client: TestClient, model: str, prompt: str, **inp: Any) -> str:
    body = {"model": model, "input": {"prompt": prompt, "megapixels": "0.25", **inp}}
    return str(client.post("/vmodel/generate", json=body, headers=AUTH).json()["id"])


@contextmanager
def _busy_batching_server(settings: Settings, engine: FakeEngine, blocker_steps: int) -> Iterator[TestClient]:
    """A server batching up to 4 images of any size, its worker busy with a blocker job so others queue up."""
    with TestClient(
        create_app(settings.model_copy(update={"max_batch": 4, "batch_max_pixels": 2**20}), engine=engine)
    ) as client:
        _submit(client, "flux-dev", "blocker", num_inference_steps=blocker_steps)
        assert engine.started.wait(5)
        yield client


def test_queued_compatible_jobs_run_as_one_call(settings: Settings) -> None:
    engine = FakeEngine(step_s=0.05)
    with _busy_batching_server(settings, engine, 20) as client:
        same = [_submit(client, "flux-schnell", f"p{i}", seed=i) for i in range(3)]
        two = _submit(client, "flux-schnell", "two", num_outputs=2, seed=9)  # 3 + 2 > 4: next call
        other_size = _submit(client, "flux-schnell", "wide", aspect_ratio="16:9")
        ids = [*same, two, other_size]
        feeds = [_wait_feed(client, i) for i in ids]
        assert all(f["status"] == "succeeded" for f in feeds)
        sizes = [[r.spec.prompt for r in call] for call in engine.calls]
        assert sizes[0] == ["blocker"]
        assert sizes[1] == ["p0", "p1", "p2"]
        assert ["two"] in sizes and ["wide"] in sizes
        assert [f["seeds"] for f in feeds[:3]] == [[0], [1], [2]]  # each keeps its own seed and outputs
        assert len(feeds[3]["output"]) == 2


class _FitsOneImage(FakeEngine):
    """Runs out of device memory for any call of more than one image."""

    def generate(self, requests: Any, on_step: Any) -> Any:
        if sum(r.spec.num_images for r in requests) > 1:
            self.calls.append(list(requests))
            raise OutOfMemory("Out of device memory at 512x512 x3; try a smaller size or n.")
        return super().generate(requests, on_step)


def test_a_batch_that_runs_out_of_memory_is_retried_one_job_at_a_time(settings: Settings) -> None:
    engine = _FitsOneImage(step_s=0.05)
    with _busy_batching_server(settings, engine, 10) as client:
        alone = [_submit(client, "flux-schnell", f"p{i}", seed=i) for i in range(3)]
        feeds = [_wait_feed(client, i) for i in alone]
        # Batched together, out of memory, then each job on its own: all three succeed.
        assert [[r.spec.prompt for r in call] for call in engine.calls[1:]] == [
            ["p0", "p1", "p2"],
            ["p0"],
            ["p1"],
            ["p2"],
        ]
        assert [f["status"] for f in feeds] == ["succeeded"] * 3 and [f["seeds"] for f in feeds] == [[0], [1], [2]]
        # A job that alone does not fit fails with the message, and the worker serves the next one.
        too_big = _wait_feed(client, _submit(client, "flux-schnell", "n2", num_outputs=2))
        assert too_big["status"] == "failed" and "Out of device memory" in too_big["error"]
        assert _wait_feed(client, _submit(client, "flux-schnell", "after"))["status"] == "succeeded"


def test_lone_request_does_not_wait(settings: Settings) -> None:
    engine = FakeEngine()
    with TestClient(create_app(settings.model_copy(update={"max_batch": 8}), engine=engine)) as client:
        resp = client.post("/v1/images/generations", json={"prompt": "alone", "size": "256x256"}, headers=AUTH)
        # It ran at once as a batch of one (the worker never holds a job back to wait for company).
        assert resp.status_code == 200 and [len(c) for c in engine.calls] == [1]


def test_cancel_one_job_of_a_batch(settings: Settings) -> None:
    engine = FakeEngine(step_s=0.05)
    with _busy_batching_server(settings, engine, 10) as client:
        keep = _submit(client, "flux-dev", "keep", num_inference_steps=30)
        drop = _submit(client, "flux-dev", "drop", num_inference_steps=30)
        deadline = time.time() + 10
        while client.get(f"/vmodel/feed/{drop}", headers=AUTH).json()["status"] != "processing":
            assert time.time() < deadline
            time.sleep(0.02)
        services: Services = client.app.state.services  # type: ignore[attr-defined]
        services.jobs.cancel_sync(drop, owner="env_" + hash_key(API_KEY)[:12])
        assert _wait_feed(client, keep)["status"] == "succeeded"
        dropped = _wait_feed(client, drop)
        assert dropped["status"] == "failed" and dropped["error"] == "canceled" and dropped["output"] is None


def test_batched_images_match_lone_ones(demo_model_dir: Path) -> None:
    engine = DiffusersEngine(ModelRegistry.demo(demo_model_dir), device="cpu", local_files_only=True)
    engine.load()
    model = ModelRegistry.default().get("flux-schnell")

    def req(prompt: str, seed: int) -> EngineRequest:
        return EngineRequest(model.make_spec(prompt=prompt, width=256, height=256, seed=seed, steps=2))

    batched = engine.generate([req("a cat", 1), req("a dog", 2)], lambda d, t, p: None)
    [[lone]] = engine.generate([req("a dog", 2)], lambda d, t, p: None)
    diff = np.abs(np.asarray(batched[1][0]).astype(int) - np.asarray(lone).astype(int)).max()
    assert diff <= 2  # same seed, same prompt: the same image, batched or not (float reordering aside)


@pytest.mark.parametrize(("device", "big_batched"), [("cpu", False), ("cuda:0", True)])
def test_default_batches_only_small_images(settings: Settings, device: str, big_batched: bool) -> None:
    engine = FakeEngine(step_s=0.05)
    engine.device = device
    # Defaults: max_batch 8, up to 320x320 on CPU and 512x512 on a GPU.
    with TestClient(create_app(settings, engine=engine)) as client:
        # 2 s of blocker: time for the next creates to queue behind it on a loaded machine (PostgreSQL too).
        _submit(client, "flux-dev", "blocker", num_inference_steps=40)
        assert engine.started.wait(5)
        big = [_submit(client, "flux-schnell", f"big{i}") for i in range(2)]  # 512x512
        xkey = {"x-key": API_KEY}
        small = [
            client.post("/v1/flux-dev", json={"prompt": f"s{i}", "width": 256, "height": 256}, headers=xkey).json()[
                "id"
            ]
            for i in range(3)
        ]
        for job_id in big:
            _wait_feed(client, job_id)
        deadline = time.time() + 10
        while client.get(f"/v1/get_result?id={small[-1]}", headers=xkey).json()["status"] != "Ready":
            assert time.time() < deadline
            time.sleep(0.02)
        big_calls = [["big0", "big1"]] if big_batched else [["big0"], ["big1"]]
        assert [[r.spec.prompt for r in c] for c in engine.calls] == [["blocker"], *big_calls, ["s0", "s1", "s2"]]


def test_one_worker_per_device_share_the_queue(settings: Settings) -> None:
    fast, slow = FakeEngine(step_s=0.01), FakeEngine(step_s=0.2)
    with TestClient(create_app(settings.model_copy(update={"max_batch": 1}), engines=[slow, fast])) as client:
        ids = [_submit(client, "flux-schnell", f"p{i}") for i in range(6)]
        assert all(_wait_feed(client, i)["status"] == "succeeded" for i in ids)
        assert len(slow.calls) >= 1 and len(fast.calls) >= 1  # both workers took jobs
        assert len(slow.calls) + len(fast.calls) == 6
        assert client.get("/health").json()["status"] == "ready"


def test_a_worker_that_failed_to_load_leaves_jobs_to_the_others(settings: Settings) -> None:
    class Broken(FakeEngine):
        def load(self) -> None:
            raise RuntimeError("no such GPU")

    broken, good = Broken(), FakeEngine()
    with TestClient(create_app(settings, engines=[broken, good])) as client:
        ids = [_submit(client, "flux-schnell", f"p{i}") for i in range(4)]
        assert all(_wait_feed(client, i)["status"] == "succeeded" for i in ids)
        assert broken.calls == [] and len(good.calls) >= 1
        health = client.get("/health").json()
        assert health["status"] == "ready" and "no such GPU" in health["error"]


def test_encoding_runs_beside_the_next_generation(settings: Settings, monkeypatch: Any) -> None:
    import fluxserve.provenance as dispatch  # the device worker encodes through its Provenance (marking)

    real_encode = dispatch.encode_image
    calls_at: list[float] = []

    def slow_encode(*args: Any, **kwargs: Any) -> bytes:
        time.sleep(0.6)
        return real_encode(*args, **kwargs)

    class Timed(FakeEngine):
        def generate(self, requests: Any, on_step: Any) -> Any:
            calls_at.append(time.time())
            return super().generate(requests, on_step)

    monkeypatch.setattr(dispatch, "encode_image", slow_encode)
    with TestClient(create_app(settings, engine=Timed(step_s=0.02))) as client:
        ids = [_submit(client, "flux-schnell", f"p{i}", megapixels="1") for i in range(3)]
        feeds = [_wait_feed(client, i) for i in ids]
        assert [f["status"] for f in feeds] == ["succeeded"] * 3
        services: Services = client.app.state.services  # type: ignore[attr-defined]
        done = [services.store.get_job(i).completed_at for i in ids]  # type: ignore[union-attr]
        if settings.on_postgres:
            # A queue task returns only once its images are stored: no overlap (queue/pg/runner.py).
            assert calls_at[1] >= done[0] and calls_at[2] >= done[1]
        else:
            # The second image was being generated while the first was still being encoded.
            assert calls_at[1] < done[0] and calls_at[2] < done[1]
        assert client.get(feeds[0]["output"][0]).status_code == 200


def test_png_compression_level_is_lossless_and_bounded() -> None:
    import io

    import pytest
    from PIL import Image

    from fluxserve.outputs import encode_image

    rng = np.random.default_rng(0)
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    img = Image.fromarray(np.stack([ramp, ramp.T, rng.integers(0, 8, (256, 256), dtype=np.uint8)], -1))
    fast, small = (encode_image(img, "png", 95, {"seed": 1}, png_compress_level=lvl) for lvl in (1, 9))
    assert len(small) < len(fast)
    for data in (fast, small):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(img))
    with pytest.raises(ValueError, match="png_compress_level"):
        Settings(png_compress_level=10)


def test_a_newcomer_told_position_1_runs_in_the_next_claim_even_under_batching(settings: Settings) -> None:
    # Key A floods small batchable tasks (the relay's 21:9 at 0.25 MP), then key B sends one: B is told
    # position 1, and the next pipeline call after the running one is B's, batch companions or not.
    from fluxserve.auth import create_key
    from tests.support.polling import wait_for

    engine = FakeEngine(step_s=0.01)
    cfg = settings.model_copy(update={"max_batch": 4, "batch_max_pixels": 4096 * 4096})
    with TestClient(create_app(cfg, engine=engine)) as client:
        services: Services = client.app.state.services  # type: ignore[attr-defined]
        b_key = create_key(services.store, "b")
        b_auth = {"Authorization": f"Bearer {b_key.key}"}
        for i in range(60):
            _submit(client, "flux-schnell", f"a{i}", aspect_ratio="21:9")
        wait_for(lambda: len(engine.calls), lambda n: n >= 1, timeout=20)
        body = {"model": "flux-schnell", "input": {"prompt": "b", "megapixels": "0.25", "aspect_ratio": "21:9"}}
        b = client.post("/vmodel/generate", json=body, headers=b_auth).json()["id"]
        calls_at_submit = len(engine.calls)
        told = services.jobs.get_sync(b, b_key.id)
        assert told.queue_position in (1, None), told  # None: already claimed
        wait_for(
            lambda: client.get(f"/vmodel/feed/{b}", headers=b_auth).json()["status"],
            lambda status: status == "succeeded",
            timeout=60,
        )
        b_call = next(i for i, call in enumerate(engine.calls) if any(r.spec.prompt == "b" for r in call))
        # The call running when B arrived may finish first, and so may one its worker claimed just before B
        # committed but had not started when counted (PostgreSQL: fetch, claim, then the engine call);
        # the next one takes B, ahead of the dozens of A's tasks still queued.
        assert b_call <= calls_at_submit + 1, (b_call, calls_at_submit)
