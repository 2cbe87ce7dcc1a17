"""The real diffusers FLUX pipeline, on the demo model, on CPU."""

from pathlib import Path

import numpy as np
import pytest

from fluxserve.engine.base import Cancelled
from fluxserve.engine.demo import is_demo_model
from fluxserve.engine.flux import DiffusersEngine
from fluxserve.models import ModelRegistry


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path) -> DiffusersEngine:
    eng = DiffusersEngine(ModelRegistry.demo(demo_model_dir), device="cpu", local_files_only=True)
    eng.load()
    return eng


def _spec(model: str = "flux-schnell", **kw: object):  # type: ignore[no-untyped-def]
    args = {"prompt": "a white siamese cat", "width": 256, "height": 256, "seed": 42, "steps": 2}
    args.update(kw)
    return ModelRegistry.default().get(model).make_spec(**args)  # type: ignore[arg-type]


def test_demo_model_is_a_diffusers_folder(demo_model_dir: Path) -> None:
    assert is_demo_model(demo_model_dir)
    assert (demo_model_dir / "model_index.json").is_file()
    assert (demo_model_dir / "transformer" / "config.json").is_file()


def test_shared_weights_load_once(engine: DiffusersEngine) -> None:
    assert set(engine.loaded_models()) == {"flux", "flux-schnell", "flux-dev", "flux-pro"}
    assert engine._pipes["flux"] is engine._pipes["flux-pro"]


def test_same_seed_same_pixels_different_seed_differs(engine: DiffusersEngine) -> None:
    steps: list[tuple[int, int]] = []
    [[a]] = engine.generate([_spec()], lambda d, t: steps.append((d, t)))
    [[b]] = engine.generate([_spec()], lambda d, t: None)
    [[c]] = engine.generate([_spec(seed=43)], lambda d, t: None)
    assert steps == [(1, 2), (2, 2)]
    assert a.size == (256, 256)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_n_outputs_each_with_its_own_seed(engine: DiffusersEngine) -> None:
    [images] = engine.generate([_spec(num_images=3, width=512, height=256, seed=10)], lambda d, t: None)
    assert [im.size for im in images] == [(512, 256)] * 3
    arrays = [np.asarray(im).astype(int) for im in images]
    assert not np.array_equal(arrays[0], arrays[1])
    # Image i of a request with seed s looks like a lone request with seed s + i.
    [[second]] = engine.generate([_spec(width=512, height=256, seed=11)], lambda d, t: None)
    assert np.abs(arrays[1] - np.asarray(second).astype(int)).max() <= 2


def test_guidance_model_runs(engine: DiffusersEngine) -> None:
    [[img]] = engine.generate([_spec("flux-dev", steps=3, guidance=5.0)], lambda d, t: None)
    assert img.size == (256, 256)


def test_cancel_between_steps(engine: DiffusersEngine) -> None:
    seen: list[int] = []

    def on_step(done: int, total: int) -> None:
        seen.append(done)
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        engine.generate([_spec("flux-dev", steps=10)], on_step)
    assert seen == [1, 2]
    # The pipeline is usable again right after a cancel.
    [[img]] = engine.generate([_spec()], lambda d, t: None)
    assert img.size == (256, 256)


def test_mixed_batch_is_refused(engine: DiffusersEngine) -> None:
    with pytest.raises(ValueError, match="batch_key"):
        engine.generate([_spec(), _spec(width=512)], lambda d, t: None)
