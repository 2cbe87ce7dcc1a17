"""GenerationSpec: what every dialect's request becomes, and the one place sizes are decided."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import InvalidInput

OutputFormat = Literal["png", "jpeg", "webp"]
# text2img: prompt only; img2img: one init image + strength; kontext: reference images on one canvas
# (FLUX.1 Kontext); references: reference images each in its own slot (FLUX.2); fill: image + mask.
Task = Literal["text2img", "img2img", "kontext", "references", "fill"]

MIN_SIDE = 256
MAX_SIDE = 2048
MAX_PIXELS = 4 * 1024 * 1024
SIDE_MULTIPLE = 16
MAX_PROMPT_CHARS = 32000
MAX_SEED = 2**32 - 1

# FLUX 3's resolutions (BFL's FLUX 3 API): the pixels each asks for, at the request's aspect ratio.
FLUX3_RESOLUTIONS = {"768sq": 768 * 768, "1k": 1024**2, "1.5k": 1536**2, "2k": 2048**2, "4k": 4096**2}

# The ~1 MP sizes Replicate's FLUX models use for each aspect ratio.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "9:16": (768, 1344),
    "21:9": (1536, 640),
    "9:21": (640, 1536),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:3": (1152, 896),
    "3:4": (896, 1152),
    "5:4": (1088, 896),
    "4:5": (896, 1088),
}
# Output sizes by megapixels, as the hosted APIs name them (Replicate's megapixels, resolution,
# output_megapixels): the aspect ratio's table size scaled to about this many pixels.
MEGAPIXELS: dict[str, float] = {"0.25": 0.25, "0.5": 0.5, "1": 1.0, "2": 2.0, "4": 4.0}

_SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
SIZE_RULE = (
    f"'WxH' with both sides multiples of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE} "
    f"and at most {MAX_PIXELS // (1024 * 1024)} megapixels (e.g. 1024x1024, 1344x768, 1792x1024), or 'auto'"
)


def check_size(
    width: int,
    height: int,
    *,
    param: str = "size",
    height_param: str | None = None,
    min_side: int = MIN_SIDE,
    max_side: int = MAX_SIDE,
    multiple: int = SIDE_MULTIPLE,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Reject sizes FLUX can't make exactly; never round. The limits are the model's (models/spec.py)."""
    ok = (
        min_side <= width <= max_side
        and min_side <= height <= max_side
        and width % multiple == 0
        and height % multiple == 0
        and width * height <= max_pixels
    )
    if not ok:
        width_ok = min_side <= width <= max_side and width % multiple == 0
        if height_param is not None and width_ok and width * height <= max_pixels:
            param = height_param  # only the height is wrong: name that field
        rule = SIZE_RULE
        if (min_side, max_side, multiple, max_pixels) != (MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE, MAX_PIXELS):
            rule = (
                f"'WxH' with both sides multiples of {multiple} between {min_side} and {max_side} "
                f"and at most {max_pixels / 2**20:g} megapixels"
            )
        raise InvalidInput(f"Invalid size {width}x{height}: {param} must be {rule}.", param=param)
    return width, height


def output_quality(quality: int | None) -> int:
    """A dialect's 0-100 quality (JPEG/WebP) as the encoder takes it: unset is 100, and 0 is 1, the lowest
    Pillow encodes (both dialects that send it document 0 as their floor)."""
    return max(1, 100 if quality is None else quality)


def parse_size(size: str | None, *, param: str = "size") -> tuple[int, int]:
    """OpenAI ``size``: 'WxH' used as given, or 'auto' (1024x1024)."""
    if size is None or size == "auto":
        return ASPECT_RATIOS["1:1"]
    m = _SIZE_RE.match(size.strip().lower())
    if not m:
        raise InvalidInput(f"Invalid size {size!r}: {param} must be {SIZE_RULE}.", param=param)
    return check_size(int(m.group(1)), int(m.group(2)), param=param)


def aspect_ratio_size(aspect_ratio: str, megapixels: str = "1", *, param: str = "aspect_ratio") -> tuple[int, int]:
    if aspect_ratio not in ASPECT_RATIOS:
        allowed = ", ".join(ASPECT_RATIOS)
        raise InvalidInput(f"Invalid {param} {aspect_ratio!r}: allowed values are {allowed}.", param=param)
    if megapixels not in MEGAPIXELS:
        allowed = ", ".join(f"'{m}'" for m in MEGAPIXELS)
        raise InvalidInput(f"Invalid megapixels {megapixels!r}: allowed values are {allowed}.", param="megapixels")
    width, height = ASPECT_RATIOS[aspect_ratio]
    if megapixels == "0.25":
        return _round16(width / 2), _round16(height / 2)
    if megapixels != "1":
        return fit_megapixel(width, height, target=round(MEGAPIXELS[megapixels] * 1024 * 1024))
    return width, height


_RATIO_RE = re.compile(r"^(\d{1,3}):(\d{1,3})$")


def ratio_size(aspect: str, *, param: str = "aspect_ratio") -> tuple[int, int]:
    """A free-form 'W:H' between 21:9 and 9:21 (BFL's Kontext), at about 1 MP."""
    m = _RATIO_RE.match(aspect)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise InvalidInput(f"{param} must look like '16:9'; got {aspect!r}.", param=param)
    w, h = int(m.group(1)), int(m.group(2))
    if not 9 / 21 - 1e-9 <= w / h <= 21 / 9 + 1e-9:
        raise InvalidInput(f"{param} must be between 21:9 and 9:21; got {aspect!r}.", param=param)
    return fit_megapixel(w, h)


def fit_megapixel(width: int, height: int, target: int = 1024 * 1024) -> tuple[int, int]:
    """The aspect ratio width:height at about ``target`` pixels, sides multiples of 16 within
    256-2048: scaled down (or up) as a whole to fit, so the ratio holds as far as 16 px allow."""
    ratio = width / height
    w = (target * ratio) ** 0.5
    h = w / ratio
    scale = min(1.0, MAX_SIDE / max(w, h), (MAX_PIXELS / (w * h)) ** 0.5)
    scale = max(scale, MIN_SIDE / min(w, h))
    return (max(MIN_SIDE, min(MAX_SIDE, _round16(w * scale))), max(MIN_SIDE, min(MAX_SIDE, _round16(h * scale))))


def _round16(x: float) -> int:
    return round(x / SIDE_MULTIPLE) * SIDE_MULTIPLE


def check_prompt(prompt: str, *, param: str = "prompt") -> str:
    if not prompt.strip():
        raise InvalidInput(f"{param} must not be empty.", param=param)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{param} is not valid Unicode text: {exc.reason}.", param=param) from exc
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(
            f"{param} is {len(prompt)} characters; the maximum is {MAX_PROMPT_CHARS}.",
            param=param,
            code="string_above_max_length",
        )
    return prompt


@dataclass(frozen=True)
class Adapter:
    """A LoRA a request asked for, resolved to a local safetensors file (fluxserve.loras)."""

    source: str  # as the request named it: a file in the LoRA folder, a hub id, a URL
    digest: str  # sha256 of the file: one adapter whatever name or URL it came by
    path: str
    scale: float

    @property
    def name(self) -> str:
        """Its adapter name in the pipeline (diffusers wants an identifier)."""
        return f"lora_{self.digest[:16]}"


@dataclass(frozen=True)
class GenerationSpec:
    """One request, in engine terms. ``seed`` is the first image's; image i uses seed + i."""

    model: str
    prompt: str
    width: int
    height: int
    num_images: int
    steps: int
    guidance: float | None
    seed: int
    output_format: OutputFormat = "png"
    quality: int = 100
    task: Task = "text2img"
    images: tuple[str, ...] = ()  # storage keys of the input images, in order
    mask: str | None = None  # storage key of the repaint mask (white = repaint)
    strength: float | None = None
    partial_images: int = 0  # previews of the image in progress (OpenAI streaming), 0-3
    loras: tuple[Adapter, ...] = ()  # active for this request only, with these scales
    upsample: bool = False  # FLUX 3: the prompt rewritten by the model's prompt upsampler first
    # How permissive the output safety check is, on BFL's scale (0 strictest, 2 the default, 6 off); other
    # dialects' flags map onto it (OpenAI moderation=low 4, Replicate disable_safety_checker 6). Capped by the
    # operator's --safety-max-tolerance where a classifier runs (engine/safety.py); nothing runs otherwise.
    safety_tolerance: int = 2
    # Fields only a hosted provider reads, passed to it as sent (FLUX 3.1's mode, bounding_boxes, search;
    # FLUX 3's grounding): the BFL dialect fills it for names an upstream serves.
    hosted: dict[str, Any] = field(default_factory=dict)

    def image_seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]

    def preview_steps(self) -> frozenset[int]:
        """Steps after which a preview is decoded: evenly spread, never the last step."""
        if self.partial_images <= 0 or self.steps < 2:
            return frozenset()
        k = min(self.partial_images, self.steps - 1)
        return frozenset(max(1, round(self.steps * i / (k + 1))) for i in range(1, k + 1))

    def batch_key(self) -> tuple[Any, ...]:
        """Specs with the same key can share one pipeline call."""
        return (
            self.model,
            self.task,
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.images,
            self.mask,
            self.strength,
            self.partial_images,
            tuple((a.digest, a.scale) for a in self.loras),
            self.upsample,
        )

    def to_dict(self) -> dict[str, Any]:
        # Field by field rather than asdict(), which deep-copies every value (a fifth of a create's store work
        # went to it); only the adapters are dataclasses, and ``hosted`` holds JSON values.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return data | {"loras": [asdict(a) for a in self.loras], "hosted": dict(self.hosted)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSpec:
        loras = tuple(Adapter(**a) for a in data.get("loras", ()))
        return cls(**{**data, "images": tuple(data.get("images", ())), "loras": loras})
