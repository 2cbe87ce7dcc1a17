"""DiffusersEngine: real diffusers FLUX pipelines, loaded once, called by one worker thread."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from PIL.Image import Image

from ..errors import GenerationFailed, OutOfMemory
from ..images import compose_references
from ..models import ModelRegistry
from .base import Cancelled, EngineRequest, OnStep
from .lora import AdapterSlots, HotswapSlots
from .speed import SpeedOptions, apply, place, resolve_attention

log = logging.getLogger(__name__)

_PIPELINE_CLASSES = {"text2img": "FluxPipeline", "kontext": "FluxKontextPipeline", "fill": "FluxFillPipeline"}
# kind "flux2" takes the class the weights name in model_index.json, if it is one of these.
FLUX2_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline")
# FLUX.2 [dev]'s prompt processor (PixtralProcessor) imports torchvision; klein's Qwen tokenizer does not.
_NEEDS_TORCHVISION = ("Flux2Pipeline",)


def _check_torchvision(weights: str, name: str) -> None:
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # ImportError, or a torchvision built for another torch (RuntimeError)
        raise RuntimeError(
            f"{weights} ({name}) needs torchvision for its prompt processor, and it did not import ({exc}); "
            "install the torchvision build that matches your torch: pip install 'fluxserve[flux2-dev]'"
        ) from exc


def pipeline_class_name(weights: str, kind: str, *, local_files_only: bool, pipeline: str = "") -> str:
    """The diffusers class for the weights, checked before any weights are read."""
    if kind == "flux3":  # Qwen3-VL's processor needs torchvision, whichever FLUX 3 pipeline
        from . import flux3

        name = pipeline or flux3.DISTILLED
        if name not in flux3.PIPELINES:
            raise RuntimeError(f"kind 'flux3' takes {' or '.join(flux3.PIPELINES)}; got {name}")
        _check_torchvision(weights, name)
        return name
    if kind != "flux2":
        return _PIPELINE_CLASSES[kind]
    from diffusers import DiffusionPipeline

    name = pipeline or str(DiffusionPipeline.load_config(weights, local_files_only=local_files_only).get("_class_name"))
    if name not in FLUX2_PIPELINES:
        raise RuntimeError(f"kind 'flux2' needs FLUX.2 weights ({', '.join(FLUX2_PIPELINES)}); {weights} is a {name}")
    if name in _NEEDS_TORCHVISION:
        _check_torchvision(weights, name)
    return name


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _pil_fallback_notice(record: logging.LogRecord) -> bool:
    """transformers says, once per class, that CLIP's and Siglip's image processors fall back to their PIL
    versions without torchvision; for these pipelines that fallback is the intended path, not a fault."""
    return "requires torchvision (not installed); falling back" not in record.getMessage()


def load_pipeline(
    weights: str,
    kind: str,
    *,
    device: str,
    local_files_only: bool,
    speed: SpeedOptions | None = None,
    pipeline: str = "",
    lora_slots: int = 4,
    upsampler: str = "",
) -> Any:
    """The one loading path for real weights and the demo model alike."""
    import diffusers
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    # bf16 is FLUX's native precision on accelerators; CPUs are slow and inexact in bf16.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    name = pipeline_class_name(weights, kind, local_files_only=local_files_only, pipeline=pipeline)
    if kind == "flux3":
        from . import flux3

        pipe = flux3.load(weights, name, dtype=dtype, upsampler=upsampler, local_files_only=local_files_only)
    else:
        pipe = getattr(diffusers, name).from_pretrained(weights, dtype=dtype, local_files_only=local_files_only)
    speed = speed or SpeedOptions()
    pipe.fluxserve_offload = place(pipe, speed, device)
    upsampling = getattr(pipe, "fluxserve_upsampling", None)  # FLUX 3's: shares pipe's modules but the upsampler
    if upsampling is not None and pipe.fluxserve_offload == "none":
        upsampling.prompt_upsampler.to(device)
    if speed.compile and speed.lora_hotswap_rank:
        # Before compiling: the slots' LoRA layers are part of the graph from the first call.
        # Kept on the transformer: img2img's pipeline (from_pipe) shares it, and so its slots.
        pipe.transformer.fluxserve_hotswap = HotswapSlots(pipe, rank=speed.lora_hotswap_rank, cached=lora_slots)
    apply(pipe, speed, device, placement=pipe.fluxserve_offload)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class DiffusersEngine:
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        device: str = "auto",
        local_files_only: bool = False,
        speed: SpeedOptions | None = None,
        lora_slots: int = 4,
    ) -> None:
        self.speed = speed or SpeedOptions()
        self.lora_slots = lora_slots
        self._adapters: dict[int, AdapterSlots | HotswapSlots] = {}  # by id() of the transformer the adapters live in
        self._registry = registry
        self._device_request = device
        self._local_files_only = local_files_only
        self._pipes: dict[str, Any] = {}
        self._img2img: dict[str, Any] = {}
        self.device = "unloaded"
        self.device_request = device  # what the operator asked for: names the worker before loading
        # Work that must happen before weights load, off the request path (building the demo model).
        self.before_load: Callable[[], object] | None = None

    def load(self) -> None:
        logging.getLogger("transformers.utils.import_utils").addFilter(_pil_fallback_notice)
        if self.before_load is not None:
            self.before_load()
        self.device = pick_device(self._device_request)
        loaded: dict[tuple[str, str, str, str], Any] = {}
        for model in self._registry:
            # Names that share weights (flux-dev / flux-pro, kontext pro / max) share one loaded pipeline.
            key = (model.weights, model.kind, model.pipeline, model.upsampler)
            if key not in loaded:
                log.info("loading %s (%s) for %s on %s", model.weights, model.kind, model.name, self.device)
                try:
                    loaded[key] = load_pipeline(
                        model.weights,
                        model.kind,
                        device=self.device,
                        local_files_only=self._local_files_only,
                        speed=self.speed,
                        pipeline=model.pipeline,
                        lora_slots=self.lora_slots,
                        upsampler=model.upsampler,
                    )
                except Exception as exc:
                    offline = (
                        " (offline: only local folders and the hub cache are used)" if self._local_files_only else ""
                    )
                    raise RuntimeError(
                        f"could not load weights {model.weights!r} for model {model.name!r}{offline}: {exc}"
                    ) from exc
            self._pipes[model.name] = loaded[key]
        if self.speed.compile:
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile for each configured size now, so no user request pays for it."""
        from PIL import Image as PILImage

        seen: set[int] = set()
        for model in self._registry:
            if id(self._pipes[model.name]) in seen:
                continue
            seen.add(id(self._pipes[model.name]))
            gray = PILImage.new("RGB", (64, 64), (128, 128, 128))
            # Kontext with a reference image runs twice the tokens of one without: warm the shape edits use.
            # FLUX.2 serves text-to-image and edits alike: both shapes (one reference; more compile on first use).
            references = {"fill": [1], "kontext": [1], "flux2": [0, 1], "flux3": [0, 1]}.get(model.kind, [0])
            for (width, height), count in ((size, n) for size in self.speed.warmup_sizes for n in references):
                images = [gray.resize((width, height))] * count
                mask = PILImage.new("L", (width, height), 255) if model.kind == "fill" else None
                keys = tuple(f"warmup/{i}.png" for i in range(len(images)))
                spec = model.make_spec(
                    prompt="warm-up",
                    width=width,
                    height=height,
                    steps=2,
                    seed=0,
                    images=keys,
                    mask="warmup/mask.png" if mask else None,
                )
                log.info("warming up %s at %dx%d with %d reference(s)", model.name, width, height, count)
                self.generate([EngineRequest(spec, images=images, mask=mask)], lambda d, t, p: None)

    def info(self) -> dict[str, Any]:
        pipes = list({id(p): p for p in self._pipes.values()}.values())
        return {
            "device": self.device,
            "attention": resolve_attention(self.speed.attention, self.device) if self._pipes else self.speed.attention,
            "compile": self.speed.compile,
            "offload": sorted({getattr(p, "fluxserve_offload", "none") for p in pipes}),
            "lossy_modes": self.speed.lossy,
        }

    def loaded_models(self) -> list[str]:
        return list(self._pipes)

    def use_pipeline(self, model_name: str, pipe: Any) -> None:
        """Serve a name with an already built pipeline (benchmarks build full-size ones in memory)."""
        self.device = str(pipe.device)
        self._pipes[model_name] = pipe

    def adapter_slots(self, pipe: Any) -> AdapterSlots | HotswapSlots:
        """img2img's pipeline shares the text-to-image transformer, and so its adapters."""
        key = id(pipe.transformer)
        if key not in self._adapters:
            hotswap = getattr(pipe.transformer, "fluxserve_hotswap", None)
            if self.speed.compile and hotswap is None:
                raise GenerationFailed("LoRA adapters under --compile need hot-swap slots: start with --lora-max-rank.")
            self._adapters[key] = hotswap or AdapterSlots(self.lora_slots)
        return self._adapters[key]

    def _pipeline(self, model_name: str, task: str) -> Any:
        pipe = self._pipes[model_name]
        if task != "img2img":
            return pipe
        if model_name not in self._img2img:
            from diffusers import FluxImg2ImgPipeline

            # Same modules, no second copy of the weights.
            self._img2img[model_name] = FluxImg2ImgPipeline.from_pipe(pipe)
            self._img2img[model_name].set_progress_bar_config(disable=True)
        return self._img2img[model_name]

    def generate(self, requests: Sequence[EngineRequest], on_step: OnStep) -> list[list[Image]]:
        import torch

        if not requests or len({r.spec.batch_key() for r in requests}) != 1:
            raise ValueError("generate() takes a non-empty batch of requests with the same spec.batch_key()")
        first = requests[0].spec
        model = self._registry.get(first.model)
        pipe = self._pipeline(first.model, first.task)
        if model.kind == "flux3":
            from . import flux3

            return flux3.generate(pipe, model, list(requests), on_step)
        prompts = [r.spec.prompt for r in requests for _ in range(r.spec.num_images)]
        # CPU generators make a seed mean the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(s) for r in requests for s in r.spec.image_seeds()]

        preview_steps = first.preview_steps()

        def callback(pipeline: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            done = step + 1
            previews = None
            if done in preview_steps:
                previews = _decode_preview(pipeline, tensors["latents"], first.height, first.width)
            try:
                on_step(done, first.steps, previews)
            except Cancelled:
                pipeline._interrupt = True
                raise
            return tensors

        kwargs: dict[str, Any] = {}
        if _takes(pipe, "guidance_scale"):  # klein KV takes no guidance at all
            if first.guidance is not None:
                kwargs["guidance_scale"] = first.guidance
            elif model.kind == "flux2":
                kwargs["guidance_scale"] = 1.0  # distilled klein: diffusers' default 4.0 only logs a warning
        inputs = requests[0]
        if first.task == "img2img":
            kwargs.update(image=inputs.images[0], strength=first.strength)
        elif first.task == "kontext":
            if inputs.images:
                kwargs["image"] = compose_references(inputs.images)
            kwargs["max_area"] = first.width * first.height  # keeps the requested size exactly
        elif first.task == "references":
            # Each reference in its own position slot; the pipeline scales any above 1 MP down itself.
            kwargs["image"] = list(inputs.images)
        elif first.task == "fill":
            kwargs.update(image=inputs.images[0], mask_image=inputs.mask)
        # Hot-swap slots always take part (unused ones are zeroed); plain slots only when asked for.
        uses_slots = first.loras or hasattr(pipe.transformer, "fluxserve_hotswap")
        adapters = self.adapter_slots(pipe) if uses_slots else None
        try:
            if adapters is not None:
                adapters.activate(pipe, first.loras)
            with out_of_memory_is_a_failure(first.width, first.height, len(prompts)), torch.inference_mode():
                result = pipe(
                    prompt=prompts,
                    height=first.height,
                    width=first.width,
                    num_inference_steps=first.steps,
                    generator=generators,
                    max_sequence_length=model.max_sequence_length,
                    callback_on_step_end=callback,
                    output_type="pil",
                    **kwargs,
                )
        finally:
            if adapters is not None:
                adapters.deactivate(pipe)
        images: list[Image] = list(result.images)
        out: list[list[Image]] = []
        for r in requests:
            out.append(images[: r.spec.num_images])
            images = images[r.spec.num_images :]
        return out


@contextlib.contextmanager
def out_of_memory_is_a_failure(width: int, height: int, count: int) -> Iterator[None]:
    """A device out of memory for this call is the job's failure at this size (smaller calls may fit)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise OutOfMemory(f"Out of device memory at {width}x{height} x{count}; try a smaller size or n.") from exc


def _takes(pipe: Any, argument: str) -> bool:
    return argument in inspect.signature(pipe.__call__).parameters


def _decode_preview(pipe: Any, latents: Any, height: int, width: int) -> list[Image]:
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
    un-normalise with the VAE's batch-norm statistics, then undo the 2x2 patchify."""
    import torch

    h, w = height // (pipe.vae_scale_factor * 2), width // (pipe.vae_scale_factor * 2)
    x = latents.reshape(latents.shape[0], h, w, latents.shape[-1]).permute(0, 3, 1, 2)
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    x = x * std.to(x.dtype) + bn.running_mean.view(1, -1, 1, 1).to(x.dtype)
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._unpatchify_latents(x)  # static: FLUX 3's modular components have no such method
