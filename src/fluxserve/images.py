"""Image inputs: safe decoding, data: URLs, and URL fetches that only reach public hosts."""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import io
import warnings
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInput, PayloadTooLarge
from .netguard import check_peer, pin_public_url, tls

MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_MASK_BYTES = 4 * 1024 * 1024
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 40_000_000
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
FETCH_TIMEOUT_S = 15.0
MAX_REDIRECTS = 5


MAX_REQUEST_PIXELS = 64_000_000  # all of one request's images together (16 uploads of 4 MP)
MAX_REQUEST_BYTES = 200 * 1024 * 1024  # all of one request's image files together, as they arrive


def declared_pixels(data: bytes) -> int:
    """Width x height from an image's header alone (0 when it is not one: decode_image says why later)."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            return int(img.size[0] * img.size[1])
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 0


class InputBudget:
    """One request's input images judged as each arrives, from its header: a running total of pixels and
    bytes, refused the moment it passes either, before the next input is fetched or anything is decoded
    (sixteen 40-megapixel one-colour PNGs are 600 KB to send but 2.5 GB decoded; sixteen 50 MB files would
    be held at once)."""

    def __init__(self, max_pixels: int = MAX_REQUEST_PIXELS, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.pixels = self.bytes = 0

    def add(self, data: bytes, *, param: str) -> bytes:
        self.bytes += len(data)
        self.pixels += declared_pixels(data)
        if self.pixels > self.max_pixels:
            raise InvalidInput(
                f"{param}: the images of one request may have {self.max_pixels // 1_000_000} megapixels in all; "
                f"these have {self.pixels / 1e6:.1f} so far.",
                param=param,
                code="image_too_large",
            )
        if self.bytes > self.max_bytes:
            raise PayloadTooLarge(
                f"{param}: the images of one request may take {self.max_bytes // 2**20} MiB in all; these take "
                f"{self.bytes / 2**20:.1f} MiB so far.",
                param=param,
                code="image_too_large",
            )
        return data


async def decode_image_async(data: bytes, *, slots: asyncio.Semaphore | None = None, **kwargs: Any) -> Image.Image:
    """decode_image off the event loop (a large image takes tens of milliseconds); with ``slots``, at
    most that many at once, so a burst of big uploads can't hold many decoded copies in memory."""
    if slots is None:
        return await asyncio.to_thread(decode_image, data, **kwargs)
    async with slots:
        return await asyncio.to_thread(decode_image, data, **kwargs)


def within_limits(width: int, height: int) -> bool:
    """A size this server decodes: MAX_IMAGE_SIDE a side, MAX_IMAGE_PIXELS in all."""
    return width <= MAX_IMAGE_SIDE and height <= MAX_IMAGE_SIDE and width * height <= MAX_IMAGE_PIXELS


def decode_image(data: bytes, *, param: str, max_bytes: int = MAX_IMAGE_BYTES, keep_alpha: bool = False) -> Image.Image:
    """Bytes -> an upright RGB (or RGBA) image, refusing bombs before any pixel is allocated."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"{param} is {len(data)} bytes; the maximum is {max_bytes} bytes.", param=param, code="image_too_large"
        )
    if not data:
        raise InvalidInput(f"{param} is an empty file.", param=param, code="invalid_image_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            # Only the header has been read here: check the declared size before decoding pixels.
            w, h = img.size
            if not within_limits(w, h):
                raise InvalidInput(
                    f"{param} is {w}x{h}; images may be at most {MAX_IMAGE_SIDE} pixels a side and "
                    f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels.",
                    param=param,
                    code="image_too_large",
                )
            img.load()
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(
            f"{param} declares more pixels than this server decodes ({exc}).", param=param, code="image_too_large"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(
            f"{param} is not a valid image: use PNG, JPEG, WebP or GIF ({type(exc).__name__}).",
            param=param,
            code="invalid_image_file",
        ) from exc
    upright: Image.Image = ImageOps.exif_transpose(img) or img
    if keep_alpha:
        out = upright.convert("RGBA")
    elif upright.mode in ("RGBA", "LA", "PA") or (upright.mode == "P" and "transparency" in upright.info):
        rgba = upright.convert("RGBA")
        # Transparent areas become white rather than whatever colour the encoder left there.
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(canvas, rgba).convert("RGB")
    else:
        out = upright.convert("RGB")
    if has_c2pa(data):  # the file as sent, so an edit's manifest can keep the input's own (provenance)
        out.info[C2PA_SOURCE] = data
    return out


C2PA_SOURCE = "fluxserve.c2pa_source"


def has_c2pa(data: bytes) -> bool:
    """Whether a file may carry a C2PA manifest (its JUMBF box and label), read without parsing it."""
    return b"jumb" in data and b"c2pa" in data


def decode_data_url(url: str, *, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise InvalidInput(f"{param} is not a valid data: URL.", param=param, code="invalid_image_url")
    if not header.endswith(";base64"):
        raise InvalidInput(f"{param} data: URL must be base64-encoded.", param=param, code="invalid_image_url")
    return decode_base64(payload, param=param)


def decode_base64(payload: str, *, param: str) -> bytes:
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise PayloadTooLarge(f"{param} is larger than {MAX_IMAGE_BYTES} bytes.", param=param, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{param} is not valid base64.", param=param, code="invalid_image_file") from exc


async def fetch_image_bytes(
    url: str,
    *,
    param: str,
    allow_private: bool,
    max_bytes: int = MAX_IMAGE_BYTES,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """A data: URL, or an http(s) URL fetched with a timeout and a size cap; every redirect hop re-checked."""
    if url.startswith("data:"):
        return decode_data_url(url, param=param)
    body = bytearray()
    await fetch_url(
        url, body.extend, param=param, allow_private=allow_private, max_bytes=max_bytes, transport=transport
    )
    return bytes(body)


async def fetch_url(
    url: str,
    sink: Callable[[bytes], object],
    *,
    param: str,
    allow_private: bool | Callable[[str], bool],
    max_bytes: int,
    timeout_s: float | None = None,  # None: FETCH_TIMEOUT_S, read when called
    what: str = "the image",
    code: str = "invalid_image_url",
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """An http(s) URL's body, chunk by chunk into ``sink``: public addresses only (each redirect hop
    re-checked, the checked address is the one connected to), a size cap, one deadline for it all.
    ``allow_private``: True, or a predicate asked of every hop's URL (an upstream's own host, and no other)."""
    timeout_s = FETCH_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        # One deadline for the whole fetch, redirects and a trickling body included.
        async with asyncio.timeout(timeout_s):
            await _fetch(
                url,
                sink,
                param=param,
                allow_private=allow_private,
                max_bytes=max_bytes,
                what=what,
                code=code,
                transport=transport,
            )
    except TimeoutError as exc:
        raise InvalidInput(
            f"{param}: fetching the URL took longer than {timeout_s:g} s.", param=param, code=code
        ) from exc


async def _fetch(
    url: str,
    sink: Callable[[bytes], object],
    *,
    param: str,
    allow_private: bool | Callable[[str], bool],
    max_bytes: int,
    what: str,
    code: str,
    transport: httpx.AsyncBaseTransport | None,
) -> None:
    client = httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=False, transport=transport, verify=tls())
    async with client:
        for _ in range(MAX_REDIRECTS + 1):
            private_ok = allow_private(url) if callable(allow_private) else allow_private
            # getaddrinfo blocks: off the event loop.
            pinned = await asyncio.to_thread(pin_public_url, url, param=param, allow_private=private_ok, code=code)
            try:
                async with client.stream(
                    "GET", pinned.url, headers=pinned.headers, extensions=pinned.extensions
                ) as resp:
                    if not private_ok:
                        check_peer(resp, param=param)
                    if resp.is_redirect and "location" in resp.headers:
                        url = urljoin(url, resp.headers["location"])
                        continue
                    if resp.status_code != 200:
                        raise InvalidInput(
                            f"{param}: fetching the URL returned HTTP {resp.status_code}.", param=param, code=code
                        )
                    size = 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise PayloadTooLarge(
                                f"{param}: {what} at the URL is larger than {max_bytes} bytes.",
                                param=param,
                                code="image_too_large" if code == "invalid_image_url" else "file_too_large",
                            )
                        written = sink(chunk)
                        if inspect.isawaitable(written):  # a sink that writes to disk does it off the loop
                            await written
                    return
            except httpx.HTTPError as exc:
                raise InvalidInput(
                    f"{param}: could not fetch the URL ({type(exc).__name__}).", param=param, code=code
                ) from exc
    raise InvalidInput(f"{param}: more than {MAX_REDIRECTS} redirects.", param=param, code=code)


def mask_from_alpha(mask: Image.Image, size: tuple[int, int], *, param: str = "mask") -> Image.Image:
    """OpenAI masks: fully transparent pixels mark the area to repaint. Returns diffusers' white-is-repaint mask."""
    if mask.size != size:
        raise InvalidInput(
            f"{param} is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; they must match.",
            param=param,
            code="invalid_mask_size",
        )
    alpha = mask.getchannel("A")
    if alpha.getextrema()[0] == 255:
        raise InvalidInput(
            f"{param} has no transparent pixels: make the area to edit fully transparent (alpha 0).",
            param=param,
            code="invalid_mask",
        )
    return alpha.point(lambda a: 255 if a == 0 else 0)


def compose_references(images: list[Image.Image], height: int = 1024) -> Image.Image:
    """Several Kontext references as one canvas, side by side at a common height.

    FLUX.1-Kontext-dev (and the installed diffusers pipeline) condition on one image, so every
    reference reaches the model by sharing that image.
    """
    if len(images) == 1:
        return images[0]
    height = min(height, max(im.height for im in images))
    scaled = [
        im.resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.LANCZOS) for im in images
    ]
    canvas = Image.new("RGB", (sum(im.width for im in scaled), height), (255, 255, 255))
    x = 0
    for im in scaled:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas
