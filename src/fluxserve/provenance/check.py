"""Reading an image's marks back: its C2PA manifest and its watermark (the check endpoint, `fluxserve verify`)."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..images import ALLOWED_FORMATS, decode_image
from . import manifest, watermark


@dataclass(frozen=True)
class Check:
    c2pa: manifest.Found
    mark: int | None  # the watermark's, None when none reads
    clarity: float  # how clearly the watermark read (0..1)

    @property
    def marked(self) -> bool:
        return self.c2pa.state in ("trusted", "valid") or self.mark is not None

    @property
    def job_mark(self) -> int | None:
        """The mark to resolve to a job: the watermark's, else the manifest's (a valid one only)."""
        if self.mark is not None:
            return self.mark
        return self.c2pa.mark if self.c2pa.state in ("trusted", "valid") else None


def file_format(data: bytes, *, param: str = "file") -> str:
    """png, jpeg, webp or gif from the file's header (InvalidInput for anything else: decode_image says)."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            return str(img.format).lower()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        # not an image of an allowed format: decode_image names the problem in its own words
        decode_image(data, param=param)
        raise


def check(data: bytes, *, param: str = "file") -> Check:
    fmt = file_format(data, param=param)
    image = decode_image(data, param=param)  # the size and bomb limits of every upload
    mark, clarity = watermark.read(image)
    return Check(manifest.read(data, fmt), mark, clarity)
