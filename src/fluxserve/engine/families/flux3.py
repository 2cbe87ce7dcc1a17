"""FLUX 3 Image Klein through diffusers' modular pipelines (Flux3DistilledModularPipeline, Flux3ModularPipeline).

They have no ``callback_on_step_end`` and no ``interrupt``: a loop block of ours, run after each denoising
step inside the pipeline's own loop, reports progress, decodes previews and raises Cancelled between steps,
so FLUX 3 jobs show steps, previews and stop on cancel as FLUX.1 and FLUX.2 jobs do."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from PIL.Image import Image

from ...errors import GenerationFailed
from ...models import ModelSpec
from ...models.demo import FLUX3_BASE_FOLDER, UPSAMPLER_FOLDER
from ...models.families import KINDS
from ..base import EngineRequest, OnStep
from ..common import check_torchvision, decode_preview, out_of_memory_is_a_failure
from ..tokens import qwen_vl_processor, vl_tokens
from .base import EngineFamily
from .flux2 import vae

DISTILLED = "Flux3DistilledModularPipeline"
BASE = "Flux3ModularPipeline"
PIPELINES = (DISTILLED, BASE)
_HIDDEN = 16
# The demo's vision tower, as the upsampler (Qwen3.5) and the text encoder (Qwen3-VL) both have it.
_VISION = {
    "depth": 1,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_heads": 2,
    "out_hidden_size": _HIDDEN,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 16,
}


def pipeline_class(weights: str, kind: str, pipeline: str, local_files_only: bool) -> str:
    """Qwen3-VL's processor needs torchvision, whichever FLUX 3 pipeline."""
    name = pipeline or DISTILLED
    if name not in PIPELINES:
        raise RuntimeError(f"kind 'flux3' takes {' or '.join(PIPELINES)}; got {name}")
    check_torchvision(weights, name)
    return name


def _step_block() -> Any:
    """The block class, made when diffusers is imported (never at fluxserve's import time)."""
    import torch
    from diffusers.modular_pipelines import ModularPipelineBlocks

    class FluxserveStep(ModularPipelineBlocks):  # type: ignore[misc]
        model_name = "flux3"

        def __init__(self) -> None:
            super().__init__()
            self.on_step: Callable[[int, Any, Any], None] | None = None  # set for each call

        @property
        def description(self) -> str:
            return "fluxserve: progress, previews and cancellation after each denoising step"

        @torch.no_grad()  # type: ignore[untyped-decorator]
        def __call__(self, components: Any, block_state: Any, i: int, t: Any) -> tuple[Any, Any]:
            if self.on_step is not None:
                self.on_step(i + 1, components, block_state.latents)
            return components, block_state

    return FluxserveStep()


def _loops(blocks: Any) -> list[Any]:
    """Every denoising loop inside the (nested) blocks: text-to-image and edits each have their own."""
    from diffusers.modular_pipelines import LoopSequentialPipelineBlocks

    if isinstance(blocks, LoopSequentialPipelineBlocks):
        return [blocks]
    return [loop for block in getattr(blocks, "sub_blocks", {}).values() for loop in _loops(block)]


def _not_a_cancel(record: logging.LogRecord) -> bool:
    """The modular loop logs every exception out of a block with its traceback; a cancel is not an error."""
    return "Cancelled" not in record.getMessage()


def _blocks(pipeline: str, *, upsampling: bool) -> Any:
    """The pipeline's blocks with our step block in each denoising loop; with or without the upsampler step."""
    from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3DistilledAutoBlocks

    blocks = (Flux3DistilledAutoBlocks if pipeline == DISTILLED else Flux3AutoBlocks)()
    if not upsampling:
        blocks.sub_blocks.pop("prompt_upsampler", None)
    step = _step_block()
    loops = _loops(blocks)
    if not loops:
        raise RuntimeError(f"{pipeline}: no denoising loop found in its blocks to report progress from")
    for loop in loops:
        loop.sub_blocks["fluxserve_step"] = step
    return blocks


def load(
    weights: str,
    pipeline: str,
    *,
    dtype: Any,
    upsampler: str = "",
    local_files_only: bool = False,
    reuse: dict[str, Any] | None = None,
) -> Any:
    """The modular pipeline as the prompt is written, with our step block in its denoising loop; with an
    ``upsampler`` (its weights), a second pipeline over the same loaded modules, with the upsampler step
    first, is kept as ``fluxserve_upsampling`` for requests that ask for prompt upsampling."""
    if pipeline not in PIPELINES:
        raise RuntimeError(f"kind 'flux3' takes {' or '.join(PIPELINES)}; got {pipeline or 'none'}")
    modular_log = logging.getLogger("diffusers.modular_pipelines.modular_pipeline")
    if _not_a_cancel not in modular_log.filters:
        modular_log.addFilter(_not_a_cancel)
    pipe = _blocks(pipeline, upsampling=False).init_pipeline(weights)  # a deep copy of the blocks: see _step()
    reuse = dict(reuse or {})
    shared_upsampler = reuse.pop("prompt_upsampler", None)
    if reuse:
        pipe.update_components(**reuse)  # already loaded elsewhere: load_components reads only the others
    pipe.load_components(dtype=dtype)
    pipe.fluxserve_upsampling = None
    if upsampler:
        from transformers import AutoProcessor, Qwen3_5ForConditionalGeneration

        offline = {"local_files_only": local_files_only}
        model = shared_upsampler or Qwen3_5ForConditionalGeneration.from_pretrained(upsampler, dtype=dtype, **offline)
        processor = AutoProcessor.from_pretrained(upsampler, **offline)
        upsampling = _blocks(pipeline, upsampling=True).init_pipeline(weights)
        shared = {name: module for name, module in pipe.components.items() if module is not None}
        upsampling.update_components(**shared, prompt_upsampler=model, prompt_upsampler_processor=processor)
        pipe.fluxserve_upsampling = upsampling
    return pipe


def _step(pipe: Any) -> Any:
    """Our step block as the pipeline runs it (its ``blocks`` property hands out copies; ``_blocks`` is it).
    One object: the deep copy kept the loops' shared block shared."""
    [step] = {id(b): b for b in (loop.sub_blocks["fluxserve_step"] for loop in _loops(pipe._blocks))}.values()
    return step


def generate(pipe: Any, model: ModelSpec, requests: list[EngineRequest], on_step: OnStep) -> list[list[Image]]:
    """One request per call (the pipeline takes one prompt); its n images from n generators."""
    import torch

    [request] = requests  # the worker never batches FLUX 3 jobs (worker._batch_for)
    spec = request.spec
    if spec.upsample:  # make_spec refused it where no upsampler is configured when the job was created
        if pipe.fluxserve_upsampling is None:
            raise GenerationFailed(f"{model.name} asks for prompt upsampling, and this worker has no upsampler.")
        pipe = pipe.fluxserve_upsampling
    preview_steps = spec.preview_steps()

    def step(done: int, components: Any, latents: Any) -> None:
        previews = decode_preview(components, latents, spec.height, spec.width) if done in preview_steps else None
        on_step(done, spec.steps, previews)  # Cancelled goes up through the pipeline's loop

    kwargs: dict[str, Any] = {}
    guider = getattr(pipe, "guider", None)  # the base model's classifier-free guidance; none when distilled
    if spec.guidance is not None and guider is not None and guider.guidance_scale != spec.guidance:
        pipe.update_components(guider=guider.new(guidance_scale=spec.guidance))
    if request.images:
        kwargs["image"] = list(request.images)
    if spec.upsample and model.demo:  # the demo's upsampler writes noise: a short caption of it is enough
        kwargs["max_new_tokens"] = 48
    hook = _step(pipe)
    hook.on_step = step
    try:
        with out_of_memory_is_a_failure(spec.width, spec.height, spec.num_images), torch.inference_mode():
            images = pipe(
                prompt=spec.prompt,
                height=spec.height,
                width=spec.width,
                num_inference_steps=spec.steps,
                num_images_per_prompt=spec.num_images,
                generator=[torch.Generator("cpu").manual_seed(s) for s in spec.image_seeds()],
                output=["images", "prompt"] if spec.upsample else "images",
                **kwargs,
            )
    finally:
        hook.on_step = None
    if spec.upsample:  # the upsampler's caption replaced the prompt in the pipeline's state: the job keeps it
        request.revised_prompt = str(images["prompt"])
        images = images["images"]
    return [list(images)]


class Upsampler:
    """The prompt upsampler's folder: a Qwen3.5 vision-language model and its processor, side by side
    (what ``upsampler = "..."`` names; black-forest-labs/flux-3-image-klein-pup in real life)."""

    def __init__(self) -> None:
        from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

        self.processor, vocab = qwen_vl_processor()
        text = {
            "vocab_size": len(vocab),
            "hidden_size": _HIDDEN,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "layer_types": ["full_attention", "full_attention"],
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [1, 1, 2],
                "mrope_interleaved": True,
                "rope_theta": 10000.0,
                "partial_rotary_factor": 1.0,
            },
            "pad_token_id": vocab["<|endoftext|>"],
            "eos_token_id": vocab["<|im_end|>"],
        }
        vision = dict(_VISION)
        self.model = Qwen3_5ForConditionalGeneration(
            Qwen3_5Config(text_config=text, vision_config=vision, **vl_tokens(vocab))
        )
        self.model.generation_config.eos_token_id = vocab["<|im_end|>"]

    def save_pretrained(self, folder: str) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)


def klein(*, distilled: bool, like: Any = None) -> Any:
    """FLUX 3 Image Klein as diffusers' modular pipeline: Flux3Transformer2DModel (flow map when distilled),
    a 32-layer Qwen3-VL (hidden states 4, 8, ... 32 stacked) and its processor, FLUX.2's VAE. ``like``: a
    klein whose text encoder, processor and VAE this one shares, as the real distilled and base models do."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
    from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3DistilledAutoBlocks
    from diffusers.modular_pipelines.flux3.image_processor import Flux3ImageProcessor
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor, vocab = qwen_vl_processor()
    text = {
        "vocab_size": len(vocab),
        "hidden_size": _HIDDEN,
        "intermediate_size": 32,
        "num_hidden_layers": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "max_position_embeddings": 8192,
        "rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True},
        "tie_word_embeddings": True,
        "pad_token_id": vocab["<|endoftext|>"],
    }
    vision = {**_VISION, "deepstack_visual_indexes": [0]}
    text_encoder = Qwen3VLForConditionalGeneration(
        Qwen3VLConfig(text_config=text, vision_config=vision, **vl_tokens(vocab))
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
    shared = (
        {name: like.components[name] for name in ("vae", "text_encoder", "tokenizer")}
        if like is not None
        else {"vae": vae(), "text_encoder": text_encoder, "tokenizer": processor}
    )
    pipe.update_components(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=6.93),
        image_processor=Flux3ImageProcessor(),
        **shared,
    )
    return pipe


def demo(with_torchvision: bool) -> dict[str, Any]:
    """Distilled and base klein, and the prompt upsampler: only where torchvision imports."""
    if not with_torchvision:
        return {}
    distilled = klein(distilled=True)
    return {
        KINDS["flux3"].demo_folder: distilled,
        FLUX3_BASE_FOLDER: klein(distilled=False, like=distilled),
        UPSAMPLER_FOLDER: Upsampler(),
    }


FAMILY = EngineFamily(name="flux3", pipeline_class=pipeline_class, demo=demo, load=load, generate=generate)
