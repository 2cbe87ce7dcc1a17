"""The real diffusers FLUX pipeline, on the demo model, on CPU."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxserve.engine.base import Cancelled, EngineRequest
from fluxserve.engine.flux import DiffusersEngine
from fluxserve.models import ModelRegistry
from fluxserve.models.demo import demo_weights, is_demo_model


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path) -> DiffusersEngine:
    eng = DiffusersEngine(ModelRegistry.demo(demo_model_dir), device="cpu", local_files_only=True)
    eng.load()
    return eng


def _req(
    model: str = "flux-schnell", images: list[Image.Image] | None = None, mask: Image.Image | None = None, **kw: object
) -> EngineRequest:
    args: dict[str, object] = {"prompt": "a white siamese cat", "width": 256, "height": 256, "seed": 42, "steps": 2}
    args.update(kw)
    images = images or []
    keys = tuple(f"in/{i}.png" for i in range(len(images)))
    spec = (
        ModelRegistry.default()
        .get(model)
        .make_spec(
            images=keys,
            mask="in/mask.png" if mask is not None else None,
            **args,  # type: ignore[arg-type]
        )
    )
    return EngineRequest(spec, images=images, mask=mask)


def test_demo_model_is_a_diffusers_folder(demo_model_dir: Path) -> None:
    assert is_demo_model(demo_model_dir)
    for kind, cls in [("text2img", "FluxPipeline"), ("kontext", "FluxKontextPipeline"), ("fill", "FluxFillPipeline")]:
        folder = demo_weights(demo_model_dir, kind)
        assert is_demo_model(folder)
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == cls
    fill = json.loads((demo_weights(demo_model_dir, "fill") / "transformer" / "config.json").read_text())
    assert fill["in_channels"] == 384 and fill["out_channels"] == 64


def test_shared_weights_load_once(engine: DiffusersEngine) -> None:
    # Every default name the demo serves here: FLUX 3's only where torchvision is installed (test_flux3).
    from fluxserve.models.demo import demo_kinds

    served = {m.name for m in ModelRegistry.default() if m.kind in demo_kinds()}
    assert set(engine.loaded_models()) == served and "flux-2-dev" in served
    assert engine.pipeline("flux") is engine.pipeline("flux-pro")
    assert engine.pipeline("flux-kontext-pro") is engine.pipeline("flux-kontext-max")
    assert engine.pipeline("flux-kontext-pro") is not engine.pipeline("flux")


def test_same_seed_same_pixels_different_seed_differs(engine: DiffusersEngine) -> None:
    steps: list[tuple[int, int]] = []
    [[a]] = engine.generate([_req()], lambda d, t, p: steps.append((d, t)))
    [[b]] = engine.generate([_req()], lambda d, t, p: None)
    [[c]] = engine.generate([_req(seed=43)], lambda d, t, p: None)
    assert steps == [(1, 2), (2, 2)]
    assert a.size == (256, 256)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_n_outputs_each_with_its_own_seed(engine: DiffusersEngine) -> None:
    [images] = engine.generate([_req(num_images=3, width=512, height=256, seed=10)], lambda d, t, p: None)
    assert [im.size for im in images] == [(512, 256)] * 3
    arrays = [np.asarray(im).astype(int) for im in images]
    assert not np.array_equal(arrays[0], arrays[1])
    # Image i of a request with seed s looks like a lone request with seed s + i.
    [[second]] = engine.generate([_req(width=512, height=256, seed=11)], lambda d, t, p: None)
    assert np.abs(arrays[1] - np.asarray(second).astype(int)).max() <= 2


def test_guidance_model_runs(engine: DiffusersEngine) -> None:
    [[img]] = engine.generate([_req("flux-dev", steps=3, guidance=5.0)], lambda d, t, p: None)
    assert img.size == (256, 256)


def test_cancel_between_steps(engine: DiffusersEngine) -> None:
    seen: list[int] = []

    def on_step(done: int, total: int, previews: object) -> None:
        seen.append(done)
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        engine.generate([_req("flux-dev", steps=10)], on_step)
    assert seen == [1, 2]
    # The pipeline is usable again right after a cancel.
    [[img]] = engine.generate([_req()], lambda d, t, p: None)
    assert img.size == (256, 256)


def test_mixed_batch_is_refused(engine: DiffusersEngine) -> None:
    with pytest.raises(ValueError, match="batch_key"):
        engine.generate([_req(), _req(width=512)], lambda d, t, p: None)


def _picture(seed: int, size: tuple[int, int] = (320, 256)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _arr(img: Image.Image) -> np.ndarray:  # type: ignore[type-arg]
    return np.asarray(img).astype(int)


def test_img2img_uses_the_input_image(engine: DiffusersEngine) -> None:
    [[a]] = engine.generate([_req("flux-dev", images=[_picture(1)], steps=4, strength=0.5)], lambda d, t, p: None)
    [[b]] = engine.generate([_req("flux-dev", images=[_picture(2)], steps=4, strength=0.5)], lambda d, t, p: None)
    assert a.size == (256, 256)
    assert not np.array_equal(_arr(a), _arr(b))


def test_kontext_every_reference_reaches_the_model(engine: DiffusersEngine) -> None:
    def run(refs: list[Image.Image]) -> np.ndarray:  # type: ignore[type-arg]
        [[img]] = engine.generate([_req("flux-kontext-pro", images=refs, steps=2)], lambda d, t, p: None)
        assert img.size == (256, 256)
        return _arr(img)

    base = run([_picture(1), _picture(2)])
    assert np.array_equal(base, run([_picture(1), _picture(2)]))
    assert not np.array_equal(base, run([_picture(1), _picture(3)]))  # only the second image changed
    # Text-only Kontext works too.
    [[plain]] = engine.generate([_req("flux-kontext-max", steps=2)], lambda d, t, p: None)
    assert plain.size == (256, 256)


def test_fill_repaints_with_a_mask(engine: DiffusersEngine) -> None:
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    [[img]] = engine.generate(
        [_req("flux-fill", images=[_picture(1, (256, 256))], mask=mask, steps=2)], lambda d, t, p: None
    )
    assert img.size == (256, 256)
