"""Build the demo model: random weights, real FLUX geometry, no network.

The result is an ordinary diffusers folder (model_index.json + components) that
loads through exactly the same code path as real FLUX weights. The images it
makes are noise; everything that shows it labels it "demo".
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..models.demo import DEMO_MARKER, demo_weights
from ..models.families import has_torchvision
from .families import FAMILIES, for_kind

DEMO_VERSION = 5  # 5: FLUX 3 klein and klein base share their text encoder and VAE, as the real ones


def build_demo_model(path: Path) -> Path:
    """Write the demo model to ``path`` (atomically; a finished folder is reused)."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    path = Path(path)
    marker = path / DEMO_MARKER
    extras = has_torchvision()
    if marker.is_file():
        built = json.loads(marker.read_text())
        if built.get("version") == DEMO_VERSION and built.get("torchvision", False) == extras:
            return path

    torch.manual_seed(0)  # every family's weights from one seeded stream, in the list's order
    folders: dict[str, Any] = {}
    for family in FAMILIES.values():
        folders.update(family.demo(extras))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))
    try:
        marker_text = json.dumps({"version": DEMO_VERSION, "label": "fluxserve demo model", "torchvision": extras})
        for folder, pipe in folders.items():
            # Modular pipelines take a str only, and record each component's place (the save folder).
            modular_args = {"overwrite_modular_index": True} if type(pipe).__name__.endswith("ModularPipeline") else {}
            pipe.save_pretrained(str(tmp / folder), **modular_args)
            (tmp / folder / DEMO_MARKER).write_text(marker_text)
            modular = tmp / folder / "modular_model_index.json"
            if modular.is_file():  # it names the folder it was saved in: the one it will be moved to
                modular.write_text(modular.read_text().replace(str(tmp / folder), str(path / folder)))
        (tmp / DEMO_MARKER).write_text(marker_text)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def build_demo_lora(
    demo_root: Path, kind: str, out: Path, *, seed: int, rank: int = 4, targets: list[str] | None = None
) -> Path:
    """A random LoRA for a demo transformer, saved as diffusers-format safetensors at ``out``
    (scaled up so the demo's one-block transformer visibly moves). Offline, like the demo model."""
    import diffusers
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    folder = demo_weights(demo_root, kind)
    family = for_kind(kind)
    cls = getattr(diffusers, family.pipeline_class(str(folder), kind, "", True))
    pipe = cls.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=targets or list(family.lora_targets), init_lora_weights=False
    )
    pipe.transformer.add_adapter(config)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_" in name:
                param.mul_(3.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=out.parent))
    try:
        cls.save_lora_weights(
            tmp, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer), safe_serialization=True
        )
        os.replace(tmp / "pytorch_lora_weights.safetensors", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
