"""A LoRA folder as an operator keeps one, built offline from the demo model's transformers."""

from __future__ import annotations

from pathlib import Path

from fluxserve.engine.demo import build_demo_lora


def build_lora_dir(demo: Path, root: Path) -> Path:
    """Files, a sub-folder, and things that must be refused."""
    import torch

    build_demo_lora(demo, "flux2", root / "klein-style.safetensors", seed=1)
    build_demo_lora(
        demo,
        "flux2",
        root / "characters" / "klein-hero" / "pytorch_lora_weights.safetensors",
        seed=2,
        rank=8,
        targets=["to_q", "to_v", "to_qkv_mlp_proj"],
    )
    build_demo_lora(demo, "text2img", root / "flux1-style.safetensors", seed=3)
    torch.save({"lora_A": torch.zeros(2, 2)}, root / "pickled.bin")
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return root
