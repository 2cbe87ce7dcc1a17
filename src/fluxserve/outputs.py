"""Encoding generated images into the requested file format, with provenance metadata."""

from __future__ import annotations

import io
import json
import math

from PIL import Image, PngImagePlugin

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_EXIF_IMAGE_DESCRIPTION = 0x010E
_EXIF_SOFTWARE = 0x0131
# A JPEG's EXIF segment holds at most 64 KiB; a 32,000-character prompt in a 3-byte script does not fit.
EXIF_TEXT_BYTES = 60_000


def _exif_text(metadata: dict[str, object]) -> str:
    """The metadata as JSON that fits the EXIF segment: a long prompt is cut (and marked), never the image.

    ASCII JSON (\\u escapes): the EXIF ImageDescription tag is ASCII, and Pillow writes other text as "?"."""
    text = json.dumps(metadata)
    prompt = str(metadata.get("prompt", ""))
    while len(text.encode()) > EXIF_TEXT_BYTES and prompt:
        over = len(text.encode()) - EXIF_TEXT_BYTES
        per_char = len(json.dumps(prompt)) / len(prompt)  # bytes per character as written, on average
        prompt = prompt[: max(0, len(prompt) - math.ceil(over / per_char) - 1)]
        text = json.dumps({**metadata, "prompt": prompt, "prompt_truncated": True})
    return text


def encode_image(
    image: Image.Image, fmt: str, quality: int, metadata: dict[str, object], *, png_compress_level: int = 6
) -> bytes:
    """``quality`` 1-100 applies to jpeg and webp; png is lossless at any ``png_compress_level`` (0-9)."""
    text = json.dumps(metadata, ensure_ascii=False)
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("parameters", text)
        info.add_text("Software", "fluxserve")
        image.save(buf, format="PNG", pnginfo=info, compress_level=png_compress_level)
    elif fmt in ("jpeg", "webp"):
        exif = Image.Exif()
        exif[_EXIF_IMAGE_DESCRIPTION] = _exif_text(metadata)
        exif[_EXIF_SOFTWARE] = "fluxserve"
        image.convert("RGB").save(buf, format=fmt.upper(), quality=max(1, min(quality, 100)), exif=exif)
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return buf.getvalue()


def read_metadata(data: bytes) -> dict[str, object]:
    """The metadata encode_image wrote (used by tests and by `fluxserve` tooling)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "PNG":
            return dict(json.loads(img.info["parameters"]))
        return dict(json.loads(img.getexif()[_EXIF_IMAGE_DESCRIPTION]))
