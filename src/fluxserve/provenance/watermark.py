"""An invisible watermark carrying a 48-bit mark the operator resolves to its job.

The method is invisible-watermark's ``dwtDctSvd`` (the one BFL's reference code ships): the Haar DWT's low
band is cut into 4x4 blocks and the largest singular value of each block's DCT (the block's own: an orthonormal
transform keeps singular values, so the DCT itself is skipped) is quantised to an odd or even quarter step,
one payload bit per block, the payload repeated over all blocks. What differs, measured (bench/provenance.py):
the luma carries it, not the chroma (JPEG's subsampling halves that); a value moves to the nearest level of
its bit, never past what a pixel can reach; the mark lives in a 512x512 copy of the image and the change is
scaled onto the full image, so a resized copy decodes once brought back to 512x512 (the library's mark does
not survive a 50% resize); bits are decoded softly, averaged over their repeats. Written here on numpy and
Pillow: the library imports torch and the desktop OpenCV at import time, which an API node that checks images
has neither of. 64 payload bits: the mark and a 16-bit check, so an unmarked image reads as "not detected"
(a chance of 1 in 65,536 of a false match), not as a random mark."""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

SIDE = 512  # the copy the mark lives in
_BLOCK = 4
# The quantisation step of a block's largest singular value. Measured on a 1 MP image: 24 in the luma decodes
# after JPEG q75 and a 50% resize at 47 dB PSNR; the library's 36 in the chroma did not survive JPEG here.
_STEP = 24.0
_BITS = 64
_LUMA = np.array([0.299, 0.587, 0.114])
_MAX_S0 = 4 * 2 * 255.0  # a 4x4 block of the low band (a 2x2 quad's sum over 2) of a white image


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


def _blocks(band: np.ndarray) -> np.ndarray:
    """An (S, S) low band as (n, 4, 4) blocks, row by row."""
    s = band.shape[0]
    return band.reshape(s // _BLOCK, _BLOCK, s // _BLOCK, _BLOCK).swapaxes(1, 2).reshape(-1, _BLOCK, _BLOCK)


def _low_band(luma: np.ndarray) -> np.ndarray:
    """The Haar DWT's LL band of a (2S, 2S) array: the sum of each 2x2 quad over 2."""
    return np.asarray(luma[::2, ::2] + luma[1::2, ::2] + luma[::2, 1::2] + luma[1::2, 1::2]) / 2


def _top_singular(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each block's largest singular value and its left and right vectors, from the eigenvectors of the 4x4
    A^T A: half the time of numpy's batched SVD, which the embed spent most of its time in."""
    values, vectors = np.linalg.eigh(np.matmul(blocks.transpose(0, 2, 1), blocks))
    s0 = np.sqrt(np.maximum(values[:, -1], 0.0))
    v = vectors[:, :, -1]
    av = np.matmul(blocks, v[:, :, None])[:, :, 0]
    # A black block has no direction of its own: any unit vector serves (its value is set from zero).
    u = np.where(s0[:, None] > 1e-9, av / np.maximum(s0, 1e-9)[:, None], v)
    return s0, u, v


def _small_luma(image: Image.Image) -> np.ndarray:
    small = image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return np.asarray(np.asarray(small, dtype=np.float64) @ _LUMA)


def embed(image: Image.Image, mark: int) -> Image.Image:
    """The image with the mark in it (RGB, same size)."""
    rgb = image.convert("RGB")
    blocks = _blocks(_low_band(_small_luma(rgb)))
    s0, u, v = _top_singular(blocks)
    half = 0.25 + 0.5 * np.resize(np.array(payload(mark), dtype=np.float64), s0.shape[0])
    # The nearest level of the bit's kind (at most half a step away), kept inside what pixels can reach.
    target = (np.round(s0 / _STEP - half) + half) * _STEP
    target = np.where(target > _MAX_S0, target - _STEP, np.where(target < 0, target + _STEP, target))
    # Only the largest singular value moves: the block plus (target - s0) u v^T, as with a full SVD rebuilt.
    delta_blocks = (target - s0)[:, None, None] * u[:, :, None] * v[:, None, :]  # the LL band's change
    n = SIDE // 2 // _BLOCK
    band = delta_blocks.reshape(n, n, _BLOCK, _BLOCK).swapaxes(1, 2).reshape(SIDE // 2, SIDE // 2) / 2
    delta = band.repeat(2, axis=0).repeat(2, axis=1).astype(np.float32)
    if rgb.size != (SIDE, SIDE):
        delta = np.asarray(Image.fromarray(delta, "F").resize(rgb.size, Image.Resampling.BILINEAR))
    return Image.fromarray(_add_luma(np.asarray(rgb), delta), "RGB")


def _add_luma(rgb: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``rgb`` (uint8) with its luma moved by ``delta``: alike in each channel, and where a channel is at 0 or
    255 what it cannot take goes to the others (a saturated red still carries the mark)."""
    out = rgb.astype(np.int16) + np.rint(delta).astype(np.int16)[..., None]  # integers: 3x faster than floats
    r, g, b = out[..., 0], out[..., 1], out[..., 2]  # (a reduce over an axis of 3 is slow in numpy)
    over = (np.minimum(np.minimum(r, g), b) < 0) | (np.maximum(np.maximum(r, g), b) > 255)
    if over.any():  # few pixels as a rule: the fix-up runs on those only
        luma = _LUMA.astype(np.float32)
        base, want = rgb[over].astype(np.float32), delta[over]
        moved = np.clip(base + want[:, None], 0, 255)
        short = want - (moved - base) @ luma
        free = ((moved > 0) & (moved < 255)) * luma
        room = free.sum(axis=-1)
        extra = np.divide(short, room, out=np.zeros_like(short), where=room > 1e-3)
        out[over] = np.rint(np.clip(moved + (free > 0) * extra[:, None], 0, 255))
    return np.asarray(np.clip(out, 0, 255), dtype=np.uint8)


def read(image: Image.Image) -> tuple[int | None, float]:
    """The mark in the image (None when there is none) and how clearly it reads (0..1: the mean margin of
    its averaged bits)."""
    blocks = _blocks(_low_band(_small_luma(image)))
    s0 = np.sqrt(np.maximum(np.linalg.eigvalsh(np.matmul(blocks.transpose(0, 2, 1), blocks))[:, -1], 0.0))
    soft = -np.sin(2 * np.pi * s0 / _STEP)  # +1 at a one's level ((k + 0.75) steps), -1 at a zero's
    idx = np.arange(s0.shape[0]) % _BITS
    avg = np.bincount(idx, weights=soft, minlength=_BITS) / np.bincount(idx, minlength=_BITS)
    return _mark_of([int(v > 0) for v in avg]), float(np.mean(np.abs(avg)))
