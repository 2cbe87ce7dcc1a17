"""The demo folders whose processors need torchvision: FLUX.2 [dev] (Mistral 3 + PixtralProcessor) and
FLUX 3 Image Klein (Qwen3-VL + Qwen3VLProcessor, diffusers' modular pipeline). Real classes, tiny widths,
built offline like the rest of the demo model (engine/demo.py)."""

from __future__ import annotations

from typing import Any

from .demo import _byte_alphabet, flux2_vae

_HIDDEN = 16
# Qwen-VL's chat format: a plain string, or parts where each image is its vision span (the processor
# expands <|image_pad|> to the image's patches).
_QWEN_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Mistral's chat format over list-of-parts content, as Flux2Pipeline's format_input builds it.
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}[IMG]{% endif %}{% endfor %}"
    "[/INST]{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
)


def _mistral_processor() -> tuple[Any, dict[str, int]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    specials += ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=512,
    )  # fmt: skip
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(patch_size=16, size={"longest_edge": 64}),
        tokenizer=tokenizer,
        patch_size=16,
        spatial_merge_size=1,
        chat_template=_MISTRAL_CHAT_TEMPLATE,
    )
    return processor, vocab


def flux2_dev() -> Any:
    """FLUX.2 [dev]: Flux2Pipeline, guidance-embedded transformer, a 30-layer Mistral 3 (hidden states
    10, 20 and 30 are stacked, as for the real 24B) with its Pixtral vision tower."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    processor, vocab = _mistral_processor()
    text = {"model_type": "mistral", "vocab_size": len(vocab), "hidden_size": _HIDDEN, "intermediate_size": 32,
            "num_hidden_layers": 30, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
            "max_position_embeddings": 512, "pad_token_id": vocab["<pad>"], "bos_token_id": vocab["<s>"],
            "eos_token_id": vocab["</s>"]}  # fmt: skip
    vision = {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "head_dim": 8, "patch_size": 16, "image_size": 64}  # fmt: skip
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(text_config=text, vision_config=vision, image_token_index=vocab["[IMG]"], spatial_merge_size=1)
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * _HIDDEN,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True,  # [dev] is guidance-distilled: the guidance goes in as an embedding
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, time_shift_type="exponential"
    )
    return Flux2Pipeline(
        scheduler=scheduler, vae=flux2_vae(), text_encoder=text_encoder, tokenizer=processor, transformer=transformer
    )


def _qwen_vl_processor() -> tuple[Any, dict[str, int]]:
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    specials += ["<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for tok in specials:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab, merges=[], model_max_length=8192, chat_template=_QWEN_VL_CHAT_TEMPLATE,
        additional_special_tokens=specials[1:], pad_token="<|endoftext|>", eos_token="<|im_end|>",
    )  # fmt: skip
    patches = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patches),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**patches),
        chat_template=_QWEN_VL_CHAT_TEMPLATE,
    )
    return processor, vocab


def _vl_tokens(vocab: dict[str, int]) -> dict[str, int]:
    return {
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
    }


class Upsampler:
    """The prompt upsampler's folder: a Qwen3.5 vision-language model and its processor, side by side
    (what ``upsampler = "..."`` names; black-forest-labs/flux-3-image-klein-pup in real life)."""

    def __init__(self) -> None:
        from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

        self.processor, vocab = _qwen_vl_processor()
        text = {"vocab_size": len(vocab), "hidden_size": _HIDDEN, "intermediate_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                "layer_types": ["full_attention", "full_attention"], "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True,
                                    "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
                "pad_token_id": vocab["<|endoftext|>"], "eos_token_id": vocab["<|im_end|>"]}  # fmt: skip
        vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": _HIDDEN,
                  "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "num_position_embeddings": 16}  # fmt: skip
        self.model = Qwen3_5ForConditionalGeneration(
            Qwen3_5Config(text_config=text, vision_config=vision, **_vl_tokens(vocab))
        )
        self.model.generation_config.eos_token_id = vocab["<|im_end|>"]

    def save_pretrained(self, folder: str) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)


def flux3_klein(*, distilled: bool) -> Any:
    """FLUX 3 Image Klein as diffusers' modular pipeline: Flux3Transformer2DModel (flow map when distilled),
    a 32-layer Qwen3-VL (hidden states 4, 8, ... 32 stacked) and its processor, FLUX.2's VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
    from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3DistilledAutoBlocks
    from diffusers.modular_pipelines.flux3.image_processor import Flux3ImageProcessor
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor, vocab = _qwen_vl_processor()
    text = {"vocab_size": len(vocab), "hidden_size": _HIDDEN, "intermediate_size": 32, "num_hidden_layers": 32,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 8192,
            "rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True},
            "tie_word_embeddings": True, "pad_token_id": vocab["<|endoftext|>"]}  # fmt: skip
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": _HIDDEN,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "deepstack_visual_indexes": [0],
              "num_position_embeddings": 16}  # fmt: skip
    text_encoder = Qwen3VLForConditionalGeneration(
        Qwen3VLConfig(text_config=text, vision_config=vision, **_vl_tokens(vocab))
    )
    transformer = Flux3Transformer2DModel(
        in_channels=128,
        cond_in_channels=128,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=8 * _HIDDEN,
        axes_dims_rope=(4, 4, 4, 4),
        flow_map=distilled,
    )
    pipe = (Flux3DistilledAutoBlocks if distilled else Flux3AutoBlocks)().init_pipeline()
    pipe.update_components(
        transformer=transformer,
        vae=flux2_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=6.93),
        text_encoder=text_encoder,
        tokenizer=processor,
        image_processor=Flux3ImageProcessor(),
    )
    return pipe
