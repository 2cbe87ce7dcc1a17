"""Encoding generated images into the requested file format, with provenance metadata."""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from collections.abc import Iterator

from PIL import Image, PngImagePlugin

from .images import MAX_IMAGE_BYTES, decode_image, within_limits

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_EXIF_IMAGE_DESCRIPTION = 0x010E
_EXIF_SOFTWARE = 0x0131
_EXIF_ORIENTATION = 0x0112
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
    image: Image.Image,
    fmt: str,
    quality: int,
    metadata: dict[str, object],
    *,
    png_compress_level: int = 6,
    xmp: bytes | None = None,
) -> bytes:
    """``quality`` 1-100 applies to jpeg and webp; png is lossless at any ``png_compress_level`` (0-9). ``xmp``:
    an XMP packet to embed (provenance's DigitalSourceType)."""
    text = json.dumps(metadata, ensure_ascii=False)
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("parameters", text)
        info.add_text("Software", "fluxserve")
        if xmp is not None:
            info.add_itxt("XML:com.adobe.xmp", xmp.decode())
        image.save(buf, format="PNG", pnginfo=info, compress_level=png_compress_level)
    elif fmt in ("jpeg", "webp"):
        exif = Image.Exif()
        exif[_EXIF_IMAGE_DESCRIPTION] = _exif_text(metadata)
        exif[_EXIF_SOFTWARE] = "fluxserve"
        extra = {} if xmp is None else {"xmp": xmp}
        image.convert("RGB").save(buf, format=fmt.upper(), quality=max(1, min(quality, 100)), exif=exif, **extra)
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return buf.getvalue()


def stamp(data: bytes, fmt: str, metadata: dict[str, object]) -> tuple[bytes, tuple[int, int]] | None:
    """``data`` with encode_image's metadata in place of any it carried and not a pixel touched, when it
    already is an upright RGB image in ``fmt`` (an upstream's answer in the format the job asked for); None
    when it must be re-encoded (another format or mode, a rotated JPEG, WebP). Only the header is read; with
    the bytes, the size the header declares."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            kind, mode, size = img.format, img.mode, img.size
            # A PNG's getexif() decodes the whole image (its eXIf chunk may follow the pixels): read ours.
            exif = _png_exif(data) if kind == "PNG" else img.getexif()
            upright = exif.get(_EXIF_ORIENTATION, 1) == 1
    except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError):
        return None
    if mode != "RGB" or kind != fmt.upper() or not upright:
        return None
    try:
        if kind == "PNG":
            return _png_with_text(data, metadata), size
        if kind == "JPEG":
            return _jpeg_with_exif(data, metadata), size
    except (struct.error, ValueError):  # a chunk or segment that isn't what its header says: re-encode it
        return None
    return None


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


_PNG_TEXT = (b"tEXt", b"iTXt", b"zTXt")
_OURS = (b"parameters\0", b"Software\0")


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(kind, start, end) of each chunk, its CRC checked (a corrupt answer is decoded, and refused, instead)."""
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        end = at + 12 + length
        if end > len(data):
            raise ValueError("a PNG chunk runs past the end")
        if zlib.crc32(data[at + 4 : end - 4]) != struct.unpack(">I", data[end - 4 : end])[0]:
            raise ValueError("a PNG chunk whose CRC does not match")
        yield data[at + 4 : at + 8], at, end
        at = end


def _png_exif(data: bytes) -> Image.Exif:
    exif = Image.Exif()
    for kind, start, end in _png_chunks(data):
        if kind == b"eXIf":
            exif.load(data[start + 8 : end - 4])
    return exif


def _png_with_text(data: bytes, metadata: dict[str, object]) -> bytes:
    """The same chunks encode_image writes (iTXt "parameters", tEXt "Software") right after IHDR, where
    readers see them before the pixels; the image's own chunks of those names dropped."""
    out, kind = [data[:8]], b""
    text = json.dumps(metadata, ensure_ascii=False).encode()
    for kind, at, end in _png_chunks(data):
        if not (kind in _PNG_TEXT and data[at + 8 : end - 4].startswith(_OURS)):
            out.append(data[at:end])
        if kind == b"IHDR":
            out.append(_png_chunk(b"iTXt", b"parameters\0\0\0\0\0" + text))
            out.append(_png_chunk(b"tEXt", b"Software\0fluxserve"))
    if kind != b"IEND":
        raise ValueError("a PNG without its end chunk (cut short)")
    return b"".join(out)


def _jpeg_with_exif(data: bytes, metadata: dict[str, object]) -> bytes:
    """An APP1 Exif segment as encode_image writes it, after SOI and any JFIF APP0, in place of the image's."""
    exif = Image.Exif()
    exif[_EXIF_IMAGE_DESCRIPTION] = _exif_text(metadata)
    exif[_EXIF_SOFTWARE] = "fluxserve"
    payload = exif.tobytes()
    if not data.endswith(b"\xff\xd9"):
        raise ValueError("a JPEG without its end marker (cut short)")
    ours = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    out, at, placed = [data[:2]], 2, False
    while at + 4 <= len(data) and data[at] == 0xFF and data[at + 1] not in (0xDA, 0xD9):  # up to start of scan
        end = at + 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
        marker, body = data[at + 1], data[at + 4 : end]
        if not placed and marker != 0xE0:
            out.append(ours)
            placed = True
        if not (marker == 0xE1 and body.startswith(b"Exif\0\0")):
            out.append(data[at:end])
        at = end
    return b"".join([*out, *([] if placed else [ours]), data[at:]])


def read_metadata(data: bytes) -> dict[str, object]:
    """The metadata encode_image wrote (used by tests and by `fluxserve` tooling)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "PNG":
            return dict(json.loads(img.info["parameters"]))
        return dict(json.loads(img.getexif()[_EXIF_IMAGE_DESCRIPTION]))


def as_asked(blob: bytes, fmt: str, quality: int, meta: dict[str, object]) -> tuple[bytes, tuple[int, int]]:
    """Another server's image (an upstream's answer) in the format the job asked for, with its size: byte for
    byte with our metadata added when it already is (read from its header, never decoded), else decoded and
    encoded (providers answer in few formats)."""
    stamped = stamp(blob, fmt, meta) if len(blob) <= MAX_IMAGE_BYTES else None
    if stamped is not None and within_limits(*stamped[1]):
        return stamped
    image = decode_image(blob, param="upstream result")
    return encode_image(image, fmt, quality, meta, png_compress_level=1), image.size
