"""FLUX.2 ([dev], [klein], klein KV): diffusers' Flux2 pipelines, one text encoder, a 32-channel VAE that
FLUX 3 shares; references go in natively, each in its own position slot."""

from __future__ import annotations

from typing import Any

from ...models.demo import FLUX2_DEV_FOLDER
from ...models.families import KINDS
from ..common import check_torchvision
from ..tokens import mistral_processor, qwen_tokenizer
from .base import EngineFamily

# The class the weights name in model_index.json must be one of these.
PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline")
# FLUX.2 [dev]'s prompt processor (PixtralProcessor) imports torchvision; klein's Qwen tokenizer does not.
_NEEDS_TORCHVISION = ("Flux2Pipeline",)
_HIDDEN = 16


def pipeline_class(weights: str, kind: str, pipeline: str, local_files_only: bool) -> str:
    from diffusers import DiffusionPipeline

    name = pipeline or str(DiffusionPipeline.load_config(weights, local_files_only=local_files_only).get("_class_name"))
    if name not in PIPELINES:
        raise RuntimeError(f"kind 'flux2' needs FLUX.2 weights ({', '.join(PIPELINES)}); {weights} is a {name}")
    if name in _NEEDS_TORCHVISION:
        check_torchvision(weights, name)
    return name


def vae() -> Any:
    """FLUX.2's VAE (FLUX 3 shares it) at tiny widths: 32 latent channels, as real."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),  # x8, then the 2x2 patchify: 16 px per token, as real
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        sample_size=256,
    )


def _transformer(*, guidance: bool) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,  # 32 latent channels x 2x2 patches, as real FLUX.2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * _HIDDEN,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance,  # [dev] is guidance-distilled: the guidance goes in as an embedding
    )


def _scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, time_shift_type="exponential"
    )


def klein() -> Any:
    """FLUX.2 [klein]: the real pipeline class and component classes, tiny widths."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer, vocab = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(vocab),
            hidden_size=_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=27,  # the pipeline stacks hidden states 9, 18 and 27, as for the real 4B
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=vocab["<|endoftext|>"],
            eos_token_id=vocab["<|im_end|>"],
        )
    )
    transformer = _transformer(guidance=False)
    return Flux2KleinPipeline(
        scheduler=_scheduler(),
        vae=vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )


def dev() -> Any:
    """FLUX.2 [dev]: Flux2Pipeline, guidance-embedded transformer, a 30-layer Mistral 3 (hidden states
    10, 20 and 30 are stacked, as for the real 24B) with its Pixtral vision tower."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    processor, vocab = mistral_processor()
    text = {
        "model_type": "mistral",
        "vocab_size": len(vocab),
        "hidden_size": _HIDDEN,
        "intermediate_size": 32,
        "num_hidden_layers": 30,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "max_position_embeddings": 512,
        "pad_token_id": vocab["<pad>"],
        "bos_token_id": vocab["<s>"],
        "eos_token_id": vocab["</s>"],
    }
    vision = {
        "model_type": "pixtral",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "head_dim": 8,
        "patch_size": 16,
        "image_size": 64,
    }
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(text_config=text, vision_config=vision, image_token_index=vocab["[IMG]"], spatial_merge_size=1)
    )
    transformer = _transformer(guidance=True)
    return Flux2Pipeline(
        scheduler=_scheduler(), vae=vae(), text_encoder=text_encoder, tokenizer=processor, transformer=transformer
    )


def demo(with_torchvision: bool) -> dict[str, Any]:
    """klein's folder everywhere; [dev]'s own (Mistral 3 + PixtralProcessor) where torchvision imports."""
    folders = {KINDS["flux2"].demo_folder: klein()}
    if with_torchvision:
        folders[FLUX2_DEV_FOLDER] = dev()
    return folders


FAMILY = EngineFamily(
    name="flux2",
    pipeline_class=pipeline_class,
    demo=demo,
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"),  # single blocks fuse QKV and the MLP
)
