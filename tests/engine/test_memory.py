"""The memory ledger (issue 34): sizes known before loading, shared components loaded once, a budget kept by
moving the least recently used pipelines to a host tier, never under a running job; sleep, wake, idle unload.
The demo model through the real loading path, on CPU."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from fluxserve.engine.base import EngineRequest
from fluxserve.engine.flux import DiffusersEngine, key_of
from fluxserve.engine.inventory import inventory
from fluxserve.models import ModelRegistry
from fluxserve.models.demo import demo_weights
from fluxserve.sizes import parse_bytes

THREE = ["flux-schnell", "flux-fill", "flux-2-klein-4b"]


def _engine(demo_model_dir: Path, names: list[str], budget: int | None = None, **kw: object) -> DiffusersEngine:
    registry = ModelRegistry.demo(demo_model_dir).only(names)
    engine = DiffusersEngine(
        registry,
        device="cpu",
        local_files_only=True,
        preload=[],
        memory_budget=budget,
        **kw,  # type: ignore[arg-type]
    )
    engine.load()
    return engine


def _run(engine: DiffusersEngine, name: str, on_step: object = None) -> list[Image.Image]:
    if name == "flux-fill":
        image, mask = Image.new("RGB", (256, 256), "gray"), Image.new("L", (256, 256), 255)
        spec = (
            ModelRegistry.default()
            .get(name)
            .make_spec(prompt="a cat", width=256, height=256, seed=1, steps=2, images=("in/0.png",), mask="in/mask.png")
        )
        request = EngineRequest(spec, images=[image], mask=mask)
    else:
        spec = ModelRegistry.default().get(name).make_spec(prompt="a cat", width=256, height=256, seed=1, steps=2)
        request = EngineRequest(spec)
    [images] = engine.generate([request], on_step or (lambda d, t, p: None))  # type: ignore[arg-type]
    return images


def _sizes(demo_model_dir: Path) -> dict[str, int]:
    registry = ModelRegistry.demo(demo_model_dir)
    out = {}
    for name in THREE:
        parts = inventory(str(demo_weights(demo_model_dir, registry.get(name).kind)), 4)
        assert parts is not None
        out[name] = sum(p.nbytes for p in parts)
    return out


def test_sizes_and_identities_are_known_before_any_weight_is_read(demo_model_dir: Path) -> None:
    flux = {p.name: p for p in inventory(str(demo_weights(demo_model_dir, "text2img")), 4) or []}
    fill = {p.name: p for p in inventory(str(demo_weights(demo_model_dir, "fill")), 4) or []}
    klein = {p.name: p for p in inventory(str(demo_weights(demo_model_dir, "flux2")), 4) or []}
    assert set(flux) == {"text_encoder", "text_encoder_2", "transformer", "vae"}  # no tokenizer or scheduler
    # The same encoder and VAE files in two folders: one identity; another transformer: another.
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert flux[name].key == fill[name].key and flux[name].nbytes == fill[name].nbytes > 0
    assert flux["transformer"].key != fill["transformer"].key
    assert not {p.key for p in klein.values()} & {p.key for p in flux.values()}
    # bfloat16 on accelerators: half of float32's bytes.
    assert inventory(str(demo_weights(demo_model_dir, "text2img")), 2)[0].nbytes * 2 == flux["text_encoder"].nbytes  # type: ignore[index]
    assert inventory(str(Path(demo_model_dir) / "no-such-folder"), 4) is None


def test_two_pipelines_from_the_same_encoder_files_share_tensors_and_count_once(demo_model_dir: Path) -> None:
    engine = _engine(demo_model_dir, ["flux-schnell", "flux-fill"])
    _run(engine, "flux-schnell")
    alone = engine.memory()["used_bytes"]
    _run(engine, "flux-fill")
    schnell, fill = engine.pipeline("flux-schnell"), engine.pipeline("flux-fill")
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert getattr(schnell, name) is getattr(fill, name)
        a, b = next(getattr(schnell, name).parameters()), next(getattr(fill, name).parameters())
        assert a.data_ptr() == b.data_ptr()  # one storage
    assert schnell.transformer is not fill.transformer
    transformer = sum(p.numel() * p.element_size() for p in fill.transformer.parameters())
    assert engine.memory()["used_bytes"] == alone + transformer  # the shared parts once
    states = engine.model_states()
    assert states["flux-fill"]["memory_bytes"] == states["flux-schnell"]["memory_bytes"] + transformer - sum(
        p.numel() * p.element_size() for p in schnell.transformer.parameters()
    )


def test_a_budget_for_two_serves_three_in_turn_least_recently_used_first(demo_model_dir: Path) -> None:
    sizes = _sizes(demo_model_dir)
    budget = sizes["flux-schnell"] + sizes["flux-2-klein-4b"] + 60_000  # two fit; all three never
    assert budget < sum(sizes.values()) - 40_000
    engine = _engine(demo_model_dir, THREE, budget)
    seen = []
    for name in ["flux-schnell", "flux-2-klein-4b", "flux-fill", "flux-schnell", "flux-2-klein-4b"]:
        _run(engine, name)
        seen.append(engine.memory()["used_bytes"])
        assert name in engine.loaded_models()
    assert max(seen) <= budget
    pool = engine.pool
    registry = ModelRegistry.demo(demo_model_dir)
    # fill came in: schnell (least recently used) went; schnell came back: klein went; klein: fill went.
    assert [engine._names(k)[0] for k in pool.evictions] == ["flux-schnell", "flux-2-klein-4b", "flux-fill"]
    assert key_of(registry.get("flux-fill")) in pool.entries  # in the host tier, not dropped
    assert engine.model_states()["flux-fill"]["state"] == "unloaded"
    assert engine.memory()["cpu_used_bytes"] > 0


def test_warming_from_the_host_tier_reads_no_file(demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fluxserve.engine.flux as flux

    sizes = _sizes(demo_model_dir)
    engine = _engine(demo_model_dir, ["flux-schnell", "flux-2-klein-4b"], max(sizes.values()) + 1000)
    first = _run(engine, "flux-schnell")
    _run(engine, "flux-2-klein-4b")
    assert engine.loaded_models() == ["flux-2-klein-4b"]
    with monkeypatch.context() as patch:
        patch.setattr(flux, "load_pipeline", lambda *a, **k: pytest.fail("read from disk again"))
        again = _run(engine, "flux-schnell")
    assert engine.loaded_models() == ["flux-schnell"]
    assert again[0].tobytes() == first[0].tobytes()
    # No host tier: what leaves the device is dropped, and comes back from disk.
    bare = _engine(demo_model_dir, ["flux-schnell", "flux-2-klein-4b"], max(sizes.values()) + 1000, cpu_memory_budget=0)
    _run(bare, "flux-schnell")
    _run(bare, "flux-2-klein-4b")
    assert list(bare.pool.entries) == [key_of(ModelRegistry.demo(demo_model_dir).get("flux-2-klein-4b"))]


def test_a_name_that_can_never_fit_stops_the_start_naming_it(demo_model_dir: Path) -> None:
    sizes = _sizes(demo_model_dir)
    with pytest.raises(RuntimeError, match=r"model 'flux-2-klein-4b' .* needs 68\d KiB .* budget is"):
        _engine(demo_model_dir, ["flux-schnell", "flux-2-klein-4b"], sizes["flux-schnell"] + 1000)
    assert parse_bytes("20GiB") == 20 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("512") == 512
    with pytest.raises(ValueError, match="a size in bytes"):
        parse_bytes("lots")


def test_preloaded_names_stay_and_a_load_that_cannot_make_room_fails_clearly(demo_model_dir: Path) -> None:
    sizes = _sizes(demo_model_dir)
    registry = ModelRegistry.demo(demo_model_dir).only(["flux-schnell", "flux-2-klein-4b"])
    engine = DiffusersEngine(
        registry,
        device="cpu",
        local_files_only=True,
        preload=["flux-schnell"],
        memory_budget=max(sizes.values()) + 1000,
    )
    engine.load()
    assert engine.loaded_models() == ["flux-schnell"]
    from fluxserve.errors import GenerationFailed

    with pytest.raises(GenerationFailed, match=r"flux-2-klein-4b needs .* held by preloaded or running models"):
        _run(engine, "flux-2-klein-4b")
    assert engine.loaded_models() == ["flux-schnell"]


def test_nothing_moves_while_a_job_runs(demo_model_dir: Path) -> None:
    sizes = _sizes(demo_model_dir)
    engine = _engine(demo_model_dir, ["flux-schnell", "flux-2-klein-4b"], max(sizes.values()) + 1000)
    started, release = threading.Event(), threading.Event()
    evicted_during: list[object] = []

    def slow(done: int, total: int, previews: object) -> None:
        started.set()
        release.wait(10)
        evicted_during.extend(engine.pool.evictions)

    slow_job = threading.Thread(target=_run, args=(engine, "flux-schnell", slow))
    slow_job.start()
    assert started.wait(60)
    other = threading.Thread(target=_run, args=(engine, "flux-2-klein-4b"))
    other.start()
    time.sleep(0.5)
    assert engine.unload_idle(0.001) == []  # busy: not idle
    assert engine.pool.evictions == [] and engine.loaded_models() == ["flux-schnell"]
    release.set()
    slow_job.join(60)
    other.join(60)
    assert evicted_during == []  # the second job waited for the first, then made room
    assert engine.loaded_models() == ["flux-2-klein-4b"]


def test_sleep_empties_the_device_and_wake_brings_preloaded_names_back(demo_model_dir: Path) -> None:
    registry = ModelRegistry.demo(demo_model_dir).only(["flux-schnell", "flux-2-klein-4b"])
    engine = DiffusersEngine(registry, device="cpu", local_files_only=True, preload=["flux-schnell"])
    engine.load()
    _run(engine, "flux-2-klein-4b")
    engine.sleep()
    assert engine.sleeping and engine.loaded_models() == [] and engine.memory()["used_bytes"] == 0
    done: list[object] = []
    waiting = threading.Thread(target=lambda: done.append(_run(engine, "flux-2-klein-4b")))
    waiting.start()
    time.sleep(1.0)
    assert done == []  # a job waits while the engine sleeps
    engine.wake_up()
    waiting.join(60)
    assert done and not engine.sleeping
    assert sorted(engine.loaded_models()) == ["flux-2-klein-4b", "flux-schnell"]


def test_idle_unload_spares_preloaded_names_and_queued_ones(demo_model_dir: Path) -> None:
    registry = ModelRegistry.demo(demo_model_dir).only(THREE)
    engine = DiffusersEngine(registry, device="cpu", local_files_only=True, preload=["flux-schnell"])
    engine.load()
    _run(engine, "flux-fill")
    _run(engine, "flux-2-klein-4b")
    assert engine.unload_idle(60) == []  # not idle that long
    time.sleep(0.2)
    assert engine.unload_idle(0.1, keep=["flux-fill"]) == ["flux-2-klein-4b"]
    assert sorted(engine.loaded_models()) == ["flux-fill", "flux-schnell"]
    assert engine.unload_idle(0) == []  # 0: never
