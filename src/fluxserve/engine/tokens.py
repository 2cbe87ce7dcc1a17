"""The demo model's tokenizers and processors: byte-level vocabularies, so every unicode prompt tokenizes
without <unk>, and the chat formats the real pipelines render prompts through. Tiny, built offline."""

from __future__ import annotations

from typing import Any

# Qwen's chat format, as the real klein tokenizer has it: the pipeline renders the prompt through it.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

# Qwen-VL's chat format: a plain string, or parts where each image is its vision span (the processor
# expands <|image_pad|> to the image's patches).
QWEN_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Mistral's chat format over list-of-parts content, as Flux2Pipeline's format_input builds it.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}[IMG]{% endif %}{% endfor %}"
    "[/INST]{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
)


# Byte-level alphabet as in GPT-2/CLIP: every unicode prompt tokenizes without <unk>.
_PRINTABLE = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))


def byte_alphabet() -> list[str]:
    codes = list(_PRINTABLE)
    extra = 0
    for b in range(256):
        if b not in codes:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def qwen_tokenizer() -> tuple[Any, dict[str, int]]:
    """FLUX.2 [klein]'s Qwen3 tokenizer with its chat format."""
    return _qwen(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], 512, QWEN_CHAT_TEMPLATE)


def _qwen(specials: list[str], max_length: int, template: str) -> tuple[Any, dict[str, int]]:
    """A byte-level Qwen tokenizer: the byte alphabet, then ``specials`` (the first is the padding)."""
    from transformers import Qwen2TokenizerFast

    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    for tok in specials:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=[],
        model_max_length=max_length,
        chat_template=template,
        additional_special_tokens=specials[1:],
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    return tokenizer, vocab


def mistral_processor() -> tuple[Any, dict[str, int]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    specials += ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in byte_alphabet():
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=512,
    )
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(patch_size=16, size={"longest_edge": 64}),
        tokenizer=tokenizer,
        patch_size=16,
        spatial_merge_size=1,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    return processor, vocab


def qwen_vl_processor() -> tuple[Any, dict[str, int]]:
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    specials += ["<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]
    tokenizer, vocab = _qwen(specials, 8192, QWEN_VL_CHAT_TEMPLATE)
    patches = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patches),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**patches),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    return processor, vocab


def _vl_tokens(vocab: dict[str, int]) -> dict[str, int]:
    return {
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
    }


def vl_tokens(vocab: dict[str, int]) -> dict[str, int]:
    return {
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
    }
