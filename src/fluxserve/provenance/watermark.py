"""An invisible watermark carrying a 48-bit mark the operator resolves to its job.

The method is invisible-watermark's ``dwtDctSvd`` (the one BFL's reference code ships): in the chroma channels,
the Haar DWT's low band is cut into 4x4 blocks and the largest singular value of each block's DCT (the
block's own: an orthonormal transform keeps singular values, so the DCT itself is skipped) is quantised
to an odd or even quarter step, one payload bit per block, the payload repeated over all blocks. Two changes,
both measured (bench/provenance.py): the mark is embedded in a 512x512 copy of the image and the change is
scaled back onto the full image, so a resized copy decodes after it is brought back to 512x512 (the library's
mark does not survive a 50% resize); and bits are decoded softly, averaged over their repeats. Written here
on numpy and Pillow: the library imports torch and the desktop OpenCV at import time, which an API node that
checks images has neither of. 64 payload bits: the mark and a 16-bit check, so an unmarked image reads as
"not detected" (a chance of 1 in 65,536 of a false match), not as a random mark."""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

SIDE = 512  # the copy the mark lives in
_BLOCK = 4
_STEP = 36.0  # the quantisation step of a block's largest singular value (the library's default scale)
_BITS = 64
# BT.601 RGB -> YUV (as OpenCV's COLOR_BGR2YUV) and back
_TO_YUV = np.array([[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]])
_TO_RGB = np.linalg.inv(_TO_YUV)


def payload(mark: int) -> list[int]:
    """The 64 bits embedded for a 48-bit mark: the mark, then its check."""
    body = mark.to_bytes(6, "big")
    check = zlib.crc32(b"fluxserve mark v1" + body) & 0xFFFF
    word = int.from_bytes(body + check.to_bytes(2, "big"), "big")
    return [(word >> (_BITS - 1 - i)) & 1 for i in range(_BITS)]


def _mark_of(bits: list[int]) -> int | None:
    word = int("".join(map(str, bits)), 2).to_bytes(8, "big")
    body, check = word[:6], int.from_bytes(word[6:], "big")
    return int.from_bytes(body, "big") if zlib.crc32(b"fluxserve mark v1" + body) & 0xFFFF == check else None


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """U and V of an (H, W, 3) float RGB array, as (2, H, W)."""
    return np.asarray(np.einsum("ij,hwj->ihw", _TO_YUV[1:], rgb))


def _blocks(band: np.ndarray) -> np.ndarray:
    """A (2, S, S) low band as (2, n, 4, 4) blocks, row by row."""
    c, s, _ = band.shape
    return band.reshape(c, s // _BLOCK, _BLOCK, s // _BLOCK, _BLOCK).swapaxes(2, 3).reshape(c, -1, _BLOCK, _BLOCK)


def _low_band(x: np.ndarray) -> np.ndarray:
    """The Haar DWT's LL band of (..., 2S, 2S): the sum of each 2x2 quad over 2."""
    return np.asarray(x[..., ::2, ::2] + x[..., 1::2, ::2] + x[..., ::2, 1::2] + x[..., 1::2, 1::2]) / 2


def _small(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float64)


def embed(image: Image.Image, mark: int) -> Image.Image:
    """The image with the mark in it (RGB, same size)."""
    rgb = image.convert("RGB")
    small = _small(rgb)
    blocks = _blocks(_low_band(_chroma(small)))
    u, s, vt = np.linalg.svd(blocks)
    bits = np.resize(np.array(payload(mark), dtype=np.float64), s.shape[1])
    s0 = s[..., 0]
    s[..., 0] = (np.floor(s0 / _STEP) + 0.25 + 0.5 * bits) * _STEP
    changed = u @ (s[..., :, None] * vt)
    delta_blocks = changed - blocks  # the LL band's change; each pixel of a quad moves by half of it
    n = SIDE // 2 // _BLOCK
    band = delta_blocks.reshape(2, n, n, _BLOCK, _BLOCK).swapaxes(2, 3).reshape(2, SIDE // 2, SIDE // 2) / 2
    chroma = band.repeat(2, axis=1).repeat(2, axis=2)
    delta = np.einsum("ij,jhw->hwi", _TO_RGB[:, 1:], chroma).astype(np.float32)  # (SIDE, SIDE, 3) in RGB
    if rgb.size != (SIDE, SIDE):
        delta = np.stack(
            [
                np.asarray(Image.fromarray(delta[..., c], "F").resize(rgb.size, Image.Resampling.BILINEAR))
                for c in range(3)
            ],
            axis=-1,
        )
    out = np.asarray(rgb, dtype=np.float32) + delta
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def read(image: Image.Image) -> tuple[int | None, float]:
    """The mark in the image (None when there is none) and how clearly it reads (0..1: the mean margin of
    its averaged bits)."""
    blocks = _blocks(_low_band(_chroma(_small(image))))
    s0 = np.linalg.svd(blocks, compute_uv=False)[..., 0]
    soft = -np.sin(2 * np.pi * (s0 / _STEP)).reshape(-1)  # +1 at a one's quarter step, -1 at a zero's
    votes = np.zeros(_BITS)
    counts = np.zeros(_BITS)
    idx = np.tile(np.arange(s0.shape[1]) % _BITS, 2)
    np.add.at(votes, idx, soft)
    np.add.at(counts, idx, 1)
    avg = votes / counts
    bits = [int(v > 0) for v in avg]
    return _mark_of(bits), float(np.mean(np.abs(avg)))
