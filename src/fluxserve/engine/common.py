"""What every family's pipelines share: the out-of-memory mapping, preview decoding, argument checks."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL.Image import Image

from ..errors import OutOfMemory


@contextlib.contextmanager
def out_of_memory_is_a_failure(width: int, height: int, count: int) -> Iterator[None]:
    """A device out of memory for this call is the job's failure at this size (smaller calls may fit)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise OutOfMemory(f"Out of device memory at {width}x{height} x{count}; try a smaller size or n.") from exc


def takes(pipe: Any, argument: str) -> bool:
    return argument in inspect.signature(pipe.__call__).parameters


def check_torchvision(weights: str, name: str) -> None:
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # ImportError, or a torchvision built for another torch (RuntimeError)
        raise RuntimeError(
            f"{weights} ({name}) needs torchvision for its prompt processor, and it did not import ({exc}); "
            "install the torchvision build that matches your torch: pip install 'fluxserve[flux2-dev]'"
        ) from exc


INDEX_FILES = ("model_index.json", "modular_model_index.json")  # a diffusers pipeline's, a modular one's


def check_weights(weights: str, *, local_files_only: bool) -> None:
    """The weights' pipeline index is there (a local folder; the hub, or only its cache offline): read at
    start for every name, so a wrong path fails the start, not a job, while no weight is read yet."""
    folder = Path(weights)
    if folder.is_dir():
        if not any((folder / name).is_file() for name in INDEX_FILES):
            raise RuntimeError(f"{weights} is a folder without {' or '.join(INDEX_FILES)}")
        return
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for name in INDEX_FILES:
        try:
            hf_hub_download(weights, name, local_files_only=local_files_only)
            return
        except EntryNotFoundError:
            continue
    raise RuntimeError(f"{weights} has no {' or '.join(INDEX_FILES)}")


def pil_fallback_notice(record: logging.LogRecord) -> bool:
    """transformers says, once per class, that CLIP's and Siglip's image processors fall back to their PIL
    versions without torchvision; for these pipelines that fallback is the intended path, not a fault."""
    return "requires torchvision (not installed); falling back" not in record.getMessage()


def decode_preview(pipe: Any, latents: Any, height: int, width: int) -> list[Image]:
    """The latents after a step, decoded by the pipeline's own VAE (a few per request at most)."""
    if hasattr(pipe.vae, "bn"):
        unpacked = _flux2_latents(pipe, latents, height, width)
    else:
        unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    decoded = pipe.vae.decode(unpacked.to(pipe.vae.dtype), return_dict=False)[0]
    images: list[Image] = pipe.image_processor.postprocess(decoded, output_type="pil")
    return images


def _flux2_latents(pipe: Any, latents: Any, height: int, width: int) -> Any:
    """FLUX.2's packed tokens (B, h*w, 128) back to VAE latents, as the pipeline does after the last step:
    un-normalise with the VAE's batch-norm statistics, then undo the 2x2 patchify (FLUX 3 shares the VAE)."""
    import torch
    from diffusers import Flux2Pipeline

    h, w = height // (pipe.vae_scale_factor * 2), width // (pipe.vae_scale_factor * 2)
    x = latents.reshape(latents.shape[0], h, w, latents.shape[-1]).permute(0, 3, 1, 2)
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    x = x * std.to(x.dtype) + bn.running_mean.view(1, -1, 1, 1).to(x.dtype)
    return Flux2Pipeline._unpatchify_latents(x)  # static: FLUX 3's modular components have no such method
