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

DEMO_MARKER = "fluxserve-demo.json"
DEMO_VERSION = 4
# One diffusers folder per pipeline kind; text2img's also serves img2img via from_pipe.
# flux2 is FLUX.2 [klein] geometry: 32 latent channels, a Qwen3 text encoder, native references.
# flux2-dev (Mistral 3 text encoder, PixtralProcessor) and flux3 (FLUX 3 Image Klein's modular pipeline,
# Qwen3-VL) need torchvision for their processors: built, and served, where it is installed.
DEMO_FOLDERS = {"text2img": "flux", "kontext": "kontext", "fill": "fill", "flux2": "flux2", "flux3": "flux3"}
UPSAMPLER_FOLDER = "flux3-pup"  # FLUX 3's prompt upsampler (flux-3-image-klein-pup's role)
# Names whose real weights differ in kind of pipeline from their kind's folder get a folder of their own.
FLUX2_DEV_FOLDER, FLUX3_BASE_FOLDER = "flux2-dev", "flux3-base"
WEIGHT_FOLDERS = {
    "black-forest-labs/FLUX.2-dev": FLUX2_DEV_FOLDER,
    "black-forest-labs/flux-3-image-klein-base": FLUX3_BASE_FOLDER,
}
# Qwen's chat format, as the real klein tokenizer has it: the pipeline renders the prompt through it.
_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

# Byte-level alphabet as in GPT-2/CLIP: every unicode prompt tokenizes without <unk>.
_PRINTABLE = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))


def _byte_alphabet() -> list[str]:
    codes = list(_PRINTABLE)
    extra = 0
    for b in range(256):
        if b not in codes:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def is_demo_model(path: Path) -> bool:
    return (path / DEMO_MARKER).is_file()


def has_torchvision() -> bool:
    """Installed, without importing it (nor torch): API nodes decide the demo's names too."""
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def demo_kinds() -> tuple[str, ...]:
    return tuple(k for k in DEMO_FOLDERS if k != "flux3" or has_torchvision())


def demo_upsampler(root: Path, kind: str) -> str:
    """FLUX 3's names get the demo's prompt upsampler (BFL: "do not use the model without it")."""
    return str(root / UPSAMPLER_FOLDER) if kind == "flux3" and has_torchvision() else ""


def demo_weights(root: Path, kind: str, weights: str = "") -> Path:
    """The folder that serves a name of this kind; FLUX.2 [dev]'s names and FLUX 3's base get their own where
    they can be built (FLUX.2 [dev]'s are served by the klein folder elsewhere)."""
    if weights in WEIGHT_FOLDERS and has_torchvision():
        return root / WEIGHT_FOLDERS[weights]
    return root / DEMO_FOLDERS[kind]


def build_demo_model(path: Path) -> Path:
    """Write the demo model to ``path`` (atomically; a finished folder is reused)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer
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

    torch.manual_seed(0)
    hidden = 32
    alphabet = _byte_alphabet()
    clip_vocab = {ch: i for i, ch in enumerate(alphabet)}
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
    pipes = {
        "text2img": FluxPipeline(scheduler=scheduler(), transformer=base, **shared),
        "kontext": FluxKontextPipeline(scheduler=scheduler(), transformer=base, **shared),
        # FLUX.1-Fill's transformer also takes the masked image (64) and the 8x8-packed mask (256).
        "fill": FluxFillPipeline(scheduler=scheduler(), transformer=transformer(in_channels=384), **shared),
    }
    folders: dict[str, Any] = {DEMO_FOLDERS[kind]: pipe for kind, pipe in pipes.items()}
    folders[DEMO_FOLDERS["flux2"]] = _flux2_klein()
    if extras:
        from .demo_extra import Upsampler, flux2_dev, flux3_klein

        folders[FLUX2_DEV_FOLDER] = flux2_dev()
        folders[DEMO_FOLDERS["flux3"]] = flux3_klein(distilled=True)
        folders[FLUX3_BASE_FOLDER] = flux3_klein(distilled=False)
        folders[UPSAMPLER_FOLDER] = Upsampler()
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


def flux2_vae() -> Any:
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


def _flux2_klein() -> Any:
    """FLUX.2 [klein]: the real pipeline class and component classes, tiny widths."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for tok in specials:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=[],
        model_max_length=512,
        chat_template=_QWEN_CHAT_TEMPLATE,
        additional_special_tokens=specials[1:],
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    hidden = 16
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(vocab),
            hidden_size=hidden,
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
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,  # 32 latent channels x 2x2 patches, as real FLUX.2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * hidden,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    vae = flux2_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, time_shift_type="exponential"
    )
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )


# LoRA targets as diffusers' own tests pick them; FLUX.2's single blocks fuse QKV and the MLP.
DEMO_LORA_TARGETS = {
    "text2img": ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"],
    "flux2": ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"],
}


def build_demo_lora(
    demo_root: Path, kind: str, out: Path, *, seed: int, rank: int = 4, targets: list[str] | None = None
) -> Path:
    """A random LoRA for a demo transformer, saved as diffusers-format safetensors at ``out``
    (scaled up so the demo's one-block transformer visibly moves). Offline, like the demo model."""
    import diffusers
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    folder = demo_weights(demo_root, kind)
    cls = diffusers.Flux2KleinPipeline if kind == "flux2" else diffusers.FluxPipeline
    pipe = cls.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=targets or DEMO_LORA_TARGETS[kind], init_lora_weights=False
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
