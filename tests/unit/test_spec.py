import dataclasses
import json

import pytest

from fluxserve.errors import InvalidInput
from fluxserve.models import ModelRegistry
from fluxserve.spec import (
    ASPECT_RATIOS,
    MAX_PROMPT_CHARS,
    Adapter,
    GenerationSpec,
    aspect_ratio_size,
    check_prompt,
    parse_size,
)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("1024x1024", (1024, 1024)),
        ("1792x1024", (1792, 1024)),
        ("1024x1792", (1024, 1792)),
        ("auto", (1024, 1024)),
        (None, (1024, 1024)),
        ("256x2048", (256, 2048)),
        ("1344x768", (1344, 768)),
    ],
)
def test_parse_size_accepts_valid(size: str | None, expected: tuple[int, int]) -> None:
    assert parse_size(size) == expected


@pytest.mark.parametrize(
    "size",
    [
        "1000x1000",
        "1024x1000",
        "128x128",
        "4096x1024",
        "2048x2048x",
        "big",
        "",
        "0x0",
        "1024*1024",
        "-1024x1024",
    ],
)
def test_parse_size_rejects_without_rounding(size: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_size(size)
    assert err.value.param == "size"
    assert "multiples of 16" in err.value.message


def test_every_aspect_ratio_is_flux_sized() -> None:
    assert len(ASPECT_RATIOS) == 11
    for ratio, (w, h) in ASPECT_RATIOS.items():
        assert w % 16 == 0 and h % 16 == 0, ratio
        assert 0.85e6 < w * h < 1.1e6, ratio
        a, b = map(int, ratio.split(":"))
        assert abs(w / h - a / b) < 0.1, ratio


def test_quarter_megapixel_halves_sides() -> None:
    assert aspect_ratio_size("1:1", "0.25") == (512, 512)
    assert aspect_ratio_size("16:9", "0.25") == (672, 384)
    for ratio in ASPECT_RATIOS:
        w, h = aspect_ratio_size(ratio, "0.25")
        assert w % 16 == 0 and h % 16 == 0


def test_bad_aspect_ratio_names_allowed_values() -> None:
    with pytest.raises(InvalidInput) as err:
        aspect_ratio_size("7:5", param="input.aspect_ratio")
    assert err.value.param == "input.aspect_ratio"
    assert "21:9" in err.value.message and "1:1" in err.value.message


def test_prompt_limits() -> None:
    assert check_prompt("a cat") == "a cat"
    for bad in ["", "   \n"]:
        with pytest.raises(InvalidInput, match="must not be empty"):
            check_prompt(bad)
    with pytest.raises(InvalidInput, match=str(MAX_PROMPT_CHARS)):
        check_prompt("x" * 100_000)


def test_image_seeds_follow_first_seed() -> None:
    spec = ModelRegistry.default().get("flux").make_spec(prompt="p", width=256, height=256, num_images=3, seed=7)
    assert spec.image_seeds() == [7, 8, 9]
    top = ModelRegistry.default().get("flux").make_spec(prompt="p", width=256, height=256, num_images=2, seed=2**32 - 1)
    assert top.image_seeds() == [2**32 - 1, 0]


def test_a_spec_stored_as_json_reads_back_the_same_with_every_kind_of_field() -> None:
    """The jobs table's spec column: to_dict (field by field, no deep copy) then from_dict gives the spec back,
    and the JSON is what dataclasses.asdict would have written (rows stored before keep reading)."""
    base = ModelRegistry.default().get("flux").make_spec(prompt="p", width=256, height=256, seed=1)
    spec = dataclasses.replace(
        base,
        images=("inputs/a/0.png", "inputs/a/1.png"),
        loras=(Adapter("style.safetensors", "ab" * 32, "/loras/style.safetensors", 0.8),),
        hosted={"raw": True, "extra": [1, {"k": "v"}]},
    )
    for s in (base, spec):
        text = json.dumps(s.to_dict())
        assert text == json.dumps(dataclasses.asdict(s))
        assert GenerationSpec.from_dict(json.loads(text)) == s
    assert spec.to_dict()["hosted"] is not spec.hosted  # the caller's dict, not the frozen spec's
