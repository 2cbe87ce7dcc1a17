"""LoRA adapters on the real demo pipelines (diffusers + peft, CPU): exact when off, hot-switched, never fused."""

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxserve.engine.base import EngineRequest
from fluxserve.engine.flux import DiffusersEngine
from fluxserve.errors import GenerationFailed
from fluxserve.loras import LoraLibrary, LoraRequest
from fluxserve.models import ModelRegistry
from fluxserve.spec import Adapter

KLEIN = ModelRegistry.default().get("flux-2-klein-4b")


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path) -> DiffusersEngine:
    eng = DiffusersEngine(
        ModelRegistry.demo(demo_model_dir).only(["flux-2-klein-4b", "flux-dev"]),
        device="cpu",
        local_files_only=True,
        lora_slots=2,
    )
    eng.load()
    return eng


@pytest.fixture(scope="module")
def library(lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoraLibrary:
    return LoraLibrary(
        lora_dir,
        tmp_path_factory.mktemp("cache"),
        cache_bytes=10**9,
        max_bytes=10**8,
        offline=True,
        allow_private=False,
    )


def _adapters(library: LoraLibrary, model: str, *pairs: tuple[str, float]) -> tuple[Adapter, ...]:
    spec = ModelRegistry.default().get(model)
    return asyncio.run(library.resolve([LoraRequest(s, w, "loras") for s, w in pairs], spec))


def _run(
    engine: DiffusersEngine,
    loras: tuple[Adapter, ...] = (),
    model: str = "flux-2-klein-4b",
    seed: int = 5,
    prompt: str = "a lighthouse",
) -> np.ndarray:  # type: ignore[type-arg]
    spec = (
        ModelRegistry.default()
        .get(model)
        .make_spec(prompt=prompt, width=256, height=256, seed=seed, steps=3, loras=loras)
    )
    [[img]] = engine.generate([EngineRequest(spec)], lambda d, t, p: None)
    return np.asarray(img, dtype=np.int16)


def test_scale_zero_is_the_base_model_and_a_scale_changes_it(engine: DiffusersEngine, library: LoraLibrary) -> None:
    base = _run(engine)
    assert np.array_equal(_run(engine, _adapters(library, "flux-2-klein-4b", ("klein-style", 0.0))), base)
    styled = _run(engine, _adapters(library, "flux-2-klein-4b", ("klein-style", 1.0)))
    assert np.abs(styled - base).mean() > 1
    # The same seed and adapter reproduce exactly; after it, a request without adapters is the base again.
    assert np.array_equal(_run(engine, _adapters(library, "flux-2-klein-4b", ("klein-style", 1.0))), styled)
    assert np.array_equal(_run(engine), base)


def test_two_adapters_mix(engine: DiffusersEngine, library: LoraLibrary) -> None:
    a = _run(engine, _adapters(library, "flux-2-klein-4b", ("klein-style", 1.0)))
    b = _run(engine, _adapters(library, "flux-2-klein-4b", ("characters/klein-hero", 1.0)))
    both = _run(engine, _adapters(library, "flux-2-klein-4b", ("klein-style", 1.0), ("characters/klein-hero", 1.0)))
    assert not np.array_equal(both, a) and not np.array_equal(both, b)
    half = _run(engine, _adapters(library, "flux-2-klein-4b", ("klein-style", 1.0), ("characters/klein-hero", 0.5)))
    assert not np.array_equal(half, both)


def test_switching_adapters_loads_each_once_and_never_the_base_model(
    engine: DiffusersEngine, library: LoraLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fluxserve.engine.flux as flux

    base_loads: list[str] = []
    monkeypatch.setattr(flux, "load_pipeline", lambda *a, **k: base_loads.append(a[0]))
    pipe = engine.pipeline("flux-2-klein-4b")
    slots = engine.adapter_slots(pipe)
    style = _adapters(library, "flux-2-klein-4b", ("klein-style", 1.0))
    hero = _adapters(library, "flux-2-klein-4b", ("characters/klein-hero", 1.0))
    first = {}
    _run(engine, style), _run(engine, hero)
    loads = slots.loads
    for i in range(4):
        for name, adapters in (("style", style), ("hero", hero)):
            img = _run(engine, adapters)
            assert np.array_equal(first.setdefault(name, img), img), f"round {i}: {name} changed"
    assert slots.loads == loads  # both resident: switching is set_adapters only
    assert base_loads == []
    assert not any(getattr(m, "merged", False) for m in pipe.transformer.modules())  # never fused


def test_the_least_recently_used_adapter_leaves_when_slots_are_full(
    engine: DiffusersEngine, library: LoraLibrary
) -> None:
    pipe = engine.pipeline("flux-2-klein-4b")
    slots = engine.adapter_slots(pipe)  # 2 slots in this engine
    style = _adapters(library, "flux-2-klein-4b", ("klein-style", 1.0))
    hero = _adapters(library, "flux-2-klein-4b", ("characters/klein-hero", 1.0))
    before = _run(engine, style)
    _run(engine, hero)
    assert set(slots.resident) == {style[0].name, hero[0].name}
    import shutil

    # A third adapter (a copy under another name is another file hash) evicts the least recently used.
    other = Path(library.cache_dir) / "copy.safetensors"
    other.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(style[0].path, other)
    other_adapter = replace(style[0], digest="0" * 64, path=str(other), source="copy")
    _run(engine, (other_adapter,))
    assert slots.resident == [hero[0].name, other_adapter.name]
    assert np.array_equal(_run(engine, style), before)  # reloaded, same pixels


def test_flux1_adapters_on_flux_dev(engine: DiffusersEngine, library: LoraLibrary) -> None:
    base = _run(engine, model="flux-dev")
    flux1 = _adapters(library, "flux-dev", ("flux1-style", 1.0))
    styled = _run(engine, flux1, model="flux-dev")
    assert np.abs(styled - base).mean() > 1
    assert np.array_equal(_run(engine, model="flux-dev"), base)
    # img2img shares the text-to-image transformer: its adapters come and go with the same slots.
    init = Image.new("RGB", (256, 256), (120, 60, 30))
    spec = (
        ModelRegistry.default()
        .get("flux-dev")
        .make_spec(prompt="a lighthouse", width=256, height=256, seed=5, steps=3, images=("in/0.png",), loras=flux1)
    )
    engine.generate([EngineRequest(spec, images=[init])], lambda d, t, p: None)
    assert np.array_equal(_run(engine, model="flux-dev"), base)


def test_an_evicted_or_unfitting_file_fails_the_job_clearly(
    engine: DiffusersEngine, library: LoraLibrary, tmp_path: Path
) -> None:
    [style] = _adapters(library, "flux-2-klein-4b", ("klein-style", 1.0))
    gone = replace(style, digest="f" * 64, path=str(tmp_path / "gone.safetensors"))
    with pytest.raises(GenerationFailed, match="no longer on this server"):
        _run(engine, (gone,))
    base = _run(engine)
    assert np.array_equal(_run(engine), base)  # the pipeline is fine after it


@pytest.mark.slow  # compile is proven once in CI (test_speed); this one runs with -m slow
def test_compiled_pipelines_hot_swap_adapters_without_recompiling(
    demo_model_dir: Path, library: LoraLibrary, engine: DiffusersEngine
) -> None:
    from torch._dynamo.utils import counters

    from fluxserve.engine.speed import SpeedOptions

    speed = SpeedOptions(compile=True, warmup_sizes=((256, 256),), lora_hotswap_rank=8)
    compiled = DiffusersEngine(
        ModelRegistry.demo(demo_model_dir).only(["flux-2-klein-4b"]),
        device="cpu",
        local_files_only=True,
        speed=speed,
        lora_slots=2,
    )
    compiled.load()  # compiles in the warm-up, with the (empty) hot-swap slots in the graph
    style = _adapters(library, "flux-2-klein-4b", ("klein-style", 1.0))
    hero = _adapters(library, "flux-2-klein-4b", ("characters/klein-hero", 0.5))
    graphs = dict(counters["stats"])
    base = _run(compiled)
    styled = _run(compiled, style)
    both = _run(compiled, style + hero)
    _run(compiled, hero)
    assert np.array_equal(_run(compiled, style), styled)
    assert np.array_equal(_run(compiled), base)  # empty slots again: the base model's pixels
    assert dict(counters["stats"]) == graphs, "an adapter switch recompiled"
    # The same images as the eager engine makes, within float rounding.
    for ours, adapters in ((styled, style), (both, style + hero)):
        eager = _run(engine, adapters)
        assert np.abs(ours - eager).max() <= 8 and np.abs(ours - eager).mean() < 0.5
    assert not np.array_equal(styled, base) and not np.array_equal(both, styled)
