"""FLUX.1 (schnell, dev, Kontext, Fill): diffusers' classic pipelines, CLIP-L + T5-XXL, a 16-channel VAE."""

from __future__ import annotations

from typing import Any

from ...models.families import KINDS
from ..tokens import byte_alphabet
from .base import EngineFamily


def pipeline_class(weights: str, kind: str, pipeline: str, local_files_only: bool) -> str:
    return KINDS[kind].pipeline


def demo(with_torchvision: bool) -> dict[str, Any]:
    """FLUX.1's three kinds at tiny widths over one set of text encoders and VAE: text-to-image (which also
    serves img2img), Kontext (the same transformer) and Fill (a transformer that also takes the mask)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    hidden = 32
    clip_vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    for tok in ("</w>", "<|startoftext|>", "<|endoftext|>"):
        clip_vocab[tok] = len(clip_vocab)
    clip_tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=hidden,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=1,
            vocab_size=len(clip_vocab),
            max_position_embeddings=77,
            projection_dim=hidden,
            bos_token_id=clip_vocab["<|startoftext|>"],
            eos_token_id=clip_vocab["<|endoftext|>"],
            pad_token_id=clip_vocab["<|endoftext|>"],
        )
    )
    t5_pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    t5_pieces += [(chr(c), -2.0) for c in range(0x20, 0x7F)]
    t5_tokenizer = T5Tokenizer(vocab=t5_pieces, extra_ids=0, model_max_length=512)
    t5 = T5EncoderModel(
        T5Config(
            d_model=hidden,
            d_ff=64,
            d_kv=8,
            num_heads=4,
            num_layers=1,
            vocab_size=len(t5_tokenizer),
            decoder_start_token_id=0,
        )
    )

    def transformer(in_channels: int) -> FluxTransformer2DModel:
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=in_channels,
            out_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=hidden,
            pooled_projection_dim=hidden,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # four blocks = x8 downsampling, as FLUX's VAE
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        mid_block_add_attention=False,  # full attention over 128x128 latents would dominate CPU time
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    shared = {
        "vae": vae,
        "text_encoder": clip,
        "tokenizer": clip_tokenizer,
        "text_encoder_2": t5,
        "tokenizer_2": t5_tokenizer,
    }

    def scheduler() -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)

    base = transformer(in_channels=64)  # 16 latent channels packed 2x2, as in FLUX.1
    return {
        KINDS["text2img"].demo_folder: FluxPipeline(scheduler=scheduler(), transformer=base, **shared),
        KINDS["kontext"].demo_folder: FluxKontextPipeline(scheduler=scheduler(), transformer=base, **shared),
        # FLUX.1-Fill's transformer also takes the masked image (64) and the 8x8-packed mask (256).
        KINDS["fill"].demo_folder: FluxFillPipeline(
            scheduler=scheduler(), transformer=transformer(in_channels=384), **shared
        ),
    }


FAMILY = EngineFamily(
    name="flux1",
    pipeline_class=pipeline_class,
    demo=demo,
    task_pipelines={"img2img": "FluxImg2ImgPipeline"},  # text-to-image's modules, no second copy of the weights
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "proj_mlp"),
)
