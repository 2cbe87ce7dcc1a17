"""Provenance cost and watermark robustness (issue 37), on whatever machine runs it.

    python bench/provenance.py [--size 1024] [--repeats 5] [--json bench/results/<machine>-<date>/provenance.json]

1. Cost per image at --size (1 MP by default): the demo FLUX pipeline's own time for the same size (plain
   diffusers, the baseline), then what marking adds: the watermark, the XMP, the C2PA signature, for png, jpeg
   and webp, against encoding alone (provenance off).
2. Robustness: fluxserve's watermark and, where `imwatermark` imports (invisible-watermark, the library BFL's
   reference code uses; not a fluxserve dependency: `pip install --no-deps invisible-watermark
   opencv-python-headless PyWavelets`), its dwtDct and dwtDctSvd methods, each carrying 64 bits, decoded after:
   nothing, JPEG q75, WebP q80, a 50% resize, a 50% resize + JPEG q75, a centred crop to 90% of each side.
   Over photo-like synthetic images and demo-pipeline outputs; a decode counts only when every bit is right.

Prints a table; never decides pass or fail.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.provenance_util import photo

from fluxserve.outputs import encode_image
from fluxserve.provenance import Provenance, mark_of, watermark

MARK = mark_of("bench")


def timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _encode(img: Image.Image, fmt: str, **kw: object) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


ATTACKS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": lambda im: im,
    "jpeg_q75": lambda im: _encode(im, "JPEG", quality=75),
    "webp_q80": lambda im: _encode(im, "WEBP", quality=80),
    "resize_50": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "resize_50_jpeg_q75": lambda im: _encode(
        im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS), "JPEG", quality=75
    ),
    "crop_90": lambda im: im.crop(
        (im.width // 20, im.height // 20, im.width - im.width // 20, im.height - im.height // 20)
    ),
}


def methods() -> dict[str, tuple[Callable[[Image.Image], Image.Image], Callable[[Image.Image], bool]]]:
    """name -> (embed, decoded correctly)."""
    out = {"fluxserve": (lambda im: watermark.embed(im, MARK), lambda im: watermark.read(im)[0] == MARK)}
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError:
        return out
    payload = MARK.to_bytes(8, "big")

    def library(method: str) -> tuple[Callable[[Image.Image], Image.Image], Callable[[Image.Image], bool]]:
        def embed(im: Image.Image) -> Image.Image:
            enc = WatermarkEncoder()
            enc.set_watermark("bytes", payload)
            bgr = np.asarray(im.convert("RGB"))[:, :, ::-1].copy()
            return Image.fromarray(enc.encode(bgr, method)[:, :, ::-1].copy())

        def read(im: Image.Image) -> bool:
            bgr = np.asarray(im.convert("RGB"))[:, :, ::-1].copy()
            return bytes(WatermarkDecoder("bytes", 64).decode(bgr, method)) == payload

        return embed, read

    out["imwatermark_dwtDct"] = library("dwtDct")
    out["imwatermark_dwtDctSvd"] = library("dwtDctSvd")
    return out


def psnr(a: Image.Image, b: Image.Image) -> float:
    err = np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2)
    return float(10 * np.log10(255**2 / max(err, 1e-9)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--images", type=int, default=4, help="photo-like images (plus as many demo outputs)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch
    from diffusers import FluxPipeline

    from fluxserve.engine.demo import build_demo_model
    from fluxserve.models.demo import demo_weights

    size = args.size
    tmp = Path(tempfile.mkdtemp(prefix="fluxserve-bench-"))
    pipe = FluxPipeline.from_pretrained(
        demo_weights(build_demo_model(tmp / "demo-model"), "text2img"), dtype=torch.float32, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)

    def generate(seed: int) -> Image.Image:
        with torch.inference_mode():
            return pipe(
                f"prompt {seed}",
                height=size,
                width=size,
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]

    generate(0)  # warm-up
    gen_s = timed(lambda: generate(1), max(1, args.repeats // 2))
    demo_images = [generate(100 + i) for i in range(args.images)]
    photos = [photo(size, seed=i) for i in range(args.images)]

    prov = Provenance.configure(os.urandom(32))
    image = photos[0]
    cost: dict[str, dict[str, float]] = {
        "watermark": {
            "embed_s": timed(lambda: watermark.embed(image, MARK), args.repeats),
            "read_s": timed(lambda: watermark.read(image), args.repeats),
        }
    }
    for fmt in ("png", "jpeg", "webp"):
        plain = timed(lambda f=fmt: encode_image(image, f, 90, {"seed": 1}, png_compress_level=1), args.repeats)
        encoded = encode_image(image, fmt, 90, {"seed": 1}, png_compress_level=1)
        sign = timed(lambda f=fmt, e=encoded: prov.sign(e, f, _claim()), args.repeats)
        full = timed(
            lambda f=fmt: prov.output(
                image, "bench", fmt=f, quality=90, meta={"seed": 1}, png_level=1, model="flux-dev"
            ),
            args.repeats,
        )
        marked = prov.output(image, "bench", fmt=fmt, quality=90, meta={"seed": 1}, png_level=1, model="flux-dev")
        cost[fmt] = {
            "encode_s": plain,
            "sign_s": sign,
            "marked_output_s": full,
            "added_s": full - plain,
            "added_bytes": len(marked) - len(encoded),
            "added_vs_generation": (full - plain) / gen_s,
        }

    robustness: dict[str, dict[str, object]] = {}
    for name, (embed, read) in methods().items():
        embed_s = timed(lambda e=embed: e(image), max(1, args.repeats // 2))
        marked = [(kind, embed(im)) for kind, ims in (("photo", photos), ("demo", demo_images)) for im in ims]
        row: dict[str, object] = {
            "embed_s_per_mp": embed_s / (size * size / 1e6),
            "psnr_db": statistics.median(psnr(o, m) for o, (_, m) in zip(photos + demo_images, marked, strict=True)),
        }
        for attack, fn in ATTACKS.items():
            row[attack] = {
                kind: sum(read(fn(m)) for k, m in marked if k == kind) / args.images for kind in ("photo", "demo")
            }
        row["false_positive"] = sum(read(im) for im in photos + demo_images) / (2 * args.images)
        robustness[name] = row

    results = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, numpy {np.__version__}",
        "size": size,
        "generation_s": gen_s,
        "generation": f"demo FLUX pipeline (plain diffusers), {args.steps} steps, {size}x{size}",
        "cost": cost,
        "robustness": robustness,
    }
    print(f"generation {size}x{size}: {gen_s * 1000:.0f} ms (demo pipeline, {args.steps} steps)")
    for fmt in ("png", "jpeg", "webp"):
        c = cost[fmt]
        print(
            f"{fmt:5} encode {c['encode_s'] * 1000:6.1f} ms, marked {c['marked_output_s'] * 1000:6.1f} ms "
            f"(+{c['added_s'] * 1000:.1f} ms, sign {c['sign_s'] * 1000:.1f} ms, +{c['added_bytes']} bytes; "
            f"{c['added_vs_generation']:.1%} of generation)"
        )
    wm = cost["watermark"]
    print(f"watermark embed {wm['embed_s'] * 1000:.1f} ms, read {wm['read_s'] * 1000:.1f} ms")
    print("decoded (photo/demo):")
    for name, row in robustness.items():
        cells = "  ".join(f"{a} {row[a]['photo']:.0%}/{row[a]['demo']:.0%}" for a in ATTACKS)  # type: ignore[index]
        print(
            f"  {name:22} {row['embed_s_per_mp'] * 1000:5.0f} ms/MP  {row['psnr_db']:.1f} dB  {cells}  "
            f"false+ {row['false_positive']:.0%}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def _claim():  # type: ignore[no-untyped-def]
    from fluxserve.provenance import Claim

    return Claim("flux-dev", time.time(), MARK)


if __name__ == "__main__":
    main()
