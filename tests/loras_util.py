"""Small LoRAs for the demo transformers, built offline with peft and saved as diffusers safetensors."""

from __future__ import annotations

import shutil
from pathlib import Path

# Targets as diffusers' own LoRA tests pick them: FLUX.2's single blocks fuse QKV and the MLP.
FLUX2_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"]
FLUX1_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]


def build_lora(pipe_cls: type, folder: Path, out: Path, targets: list[str], seed: int, rank: int = 4) -> Path:
    """A random adapter (scaled up so the demo's one-block transformer visibly moves) at ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = pipe_cls.from_pretrained(folder, dtype=torch.float32, local_files_only=True)  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_" in name:
                param.mul_(3.0)
    tmp = out.parent / f".{out.name}.tmp"
    pipe_cls.save_lora_weights(tmp, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),  # type: ignore[attr-defined]
                               safe_serialization=True)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    (tmp / "pytorch_lora_weights.safetensors").rename(out)
    shutil.rmtree(tmp)
    return out


def build_lora_dir(demo: Path, root: Path) -> Path:
    """A LoRA folder as an operator keeps one: files, a sub-folder, and things that must be refused."""
    import torch
    from diffusers import Flux2KleinPipeline, FluxPipeline

    from fluxserve.engine.demo import demo_weights

    klein, flux = demo_weights(demo, "flux2"), demo_weights(demo, "text2img")
    build_lora(Flux2KleinPipeline, klein, root / "klein-style.safetensors", FLUX2_TARGETS, seed=1)
    build_lora(Flux2KleinPipeline, klein, root / "characters" / "klein-hero" / "pytorch_lora_weights.safetensors",
               ["to_q", "to_v", "to_qkv_mlp_proj"], seed=2, rank=8)  # fmt: skip
    build_lora(FluxPipeline, flux, root / "flux1-style.safetensors", FLUX1_TARGETS, seed=3)
    torch.save({"lora_A": torch.zeros(2, 2)}, root / "pickled.bin")
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return root
