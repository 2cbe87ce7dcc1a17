"""BFL's FLUX 3 request shape (issue 36 #1): resolution and aspect_ratio to sizes from the model's limits."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fluxserve.api.bfl_schemas import Flux3Inputs
from fluxserve.errors import InvalidInput
from fluxserve.models import ModelRegistry

KLEIN = ModelRegistry.default().get("flux-3-image-klein")


def _size(first: tuple[int, int] | None = None, **body: object) -> tuple[int, int]:
    return Flux3Inputs.model_validate({"prompt": "p", **body})._size(KLEIN, first)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "first", "size"),
    [
        ({}, None, (1024, 1024)),
        ({"resolution": "1k", "aspect_ratio": "16:9"}, None, (1360, 768)),
        ({"resolution": "2k"}, None, (2048, 2048)),
        ({"resolution": "1.5k", "aspect_ratio": "auto"}, (800, 400), (2048, 1024)),  # within 2048 a side
        ({"aspect_ratio": "match_first_image"}, (600, 900), (832, 1248)),
        ({"resolution": "768sq"}, None, (768, 768)),
    ],
)
def test_resolution_and_aspect_ratio_make_the_size(
    body: dict[str, object], first: tuple[int, int] | None, size: tuple[int, int]
) -> None:
    w, h = _size(first, **body)
    assert (w, h) == size and w % 16 == 0 and h % 16 == 0


@pytest.mark.parametrize(
    ("body", "first", "param"),
    [
        ({"resolution": "4k"}, None, "resolution"),  # 16 MP: past the model's 4
        ({"resolution": "768sq", "aspect_ratio": "16:9"}, None, "aspect_ratio"),
        ({"aspect_ratio": "match_first_image"}, None, "aspect_ratio"),
        ({"aspect_ratio": "30:9"}, None, "aspect_ratio"),
        ({"aspect_ratio": "wide"}, None, "aspect_ratio"),
    ],
)
def test_what_the_model_cannot_make_is_refused_by_name(
    body: dict[str, object], first: tuple[int, int] | None, param: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        _size(first, **body)
    assert err.value.param == param


def test_4k_is_allowed_where_the_model_allows_16_megapixels() -> None:
    big = replace(KLEIN, max_pixels=4096 * 4096, max_side=4096)
    inputs = Flux3Inputs.model_validate({"prompt": "p", "resolution": "4k"})
    with pytest.raises(InvalidInput, match=r"4\.2 MP"):  # the default model says what it makes
        inputs._size(KLEIN, None)  # type: ignore[attr-defined]
    assert inputs._size(big, None)[0] >= 2048  # type: ignore[attr-defined]


def test_the_flux2_style_fields_stay_aliases_and_images_is_bounded() -> None:
    assert Flux3Inputs.model_validate({"prompt": "p", "input_image_10": "x"}).input_image_10 == "x"  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        Flux3Inputs.model_validate({"prompt": "p", "images": ["x"] * 11})
    with pytest.raises(ValueError):
        Flux3Inputs.model_validate({"prompt": "p", "resolution": "8k"})
