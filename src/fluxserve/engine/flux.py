"""DiffusersEngine: real diffusers FLUX pipelines, loaded once, called by one worker thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from PIL.Image import Image

from ..errors import GenerationFailed
from ..images import compose_references
from ..models import ModelRegistry, ModelSpec
from .base import Cancelled, EngineRequest, OnStep
from .common import check_weights, decode_preview, out_of_memory_is_a_failure, pil_fallback_notice, takes
from .families import for_kind
from .lora import AdapterSlots, HotswapSlots
from .speed import SpeedOptions, apply, place, resolve_attention

log = logging.getLogger(__name__)


def pipeline_class_name(weights: str, kind: str, *, local_files_only: bool, pipeline: str = "") -> str:
    """The diffusers class for the weights, checked before any weights are read."""
    return for_kind(kind).pipeline_class(weights, kind, pipeline, local_files_only)


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    # bf16 is FLUX's native precision on accelerators; CPUs are slow and inexact in bf16.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    name = pipeline_class_name(weights, kind, local_files_only=local_files_only, pipeline=pipeline)
    pipe = for_kind(kind).load(weights, name, dtype=dtype, upsampler=upsampler, local_files_only=local_files_only)
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
        step_delay_s: float = 0.0,
        preload: Collection[str] | None = None,
    ) -> None:
        self.speed = speed or SpeedOptions()
        self.step_delay_s = step_delay_s  # the demo's: a pause after each step, so a job takes a while
        self.lora_slots = lora_slots
        self._adapters: dict[int, AdapterSlots | HotswapSlots] = {}  # by id() of the transformer the adapters live in
        self._registry = registry
        self._device_request = device
        self._local_files_only = local_files_only
        self._pipes: dict[str, Any] = {}  # by name, once loaded
        self._loaded: dict[tuple[str, str, str, str], Any] = {}  # by (weights, kind, pipeline, upsampler)
        # Names loaded at start (None: every name); the rest load when their first job runs.
        self._preload = None if preload is None else set(preload)
        self._by_task: dict[tuple[str, str], Any] = {}  # (name, task): another class over the same modules
        self.device = "unloaded"
        self.device_request = device  # what the operator asked for: names the worker before loading
        # Work that must happen before weights load, off the request path (building the demo model).
        self.before_load: Callable[[], object] | None = None

    def load(self) -> None:
        """Pick the device and check every name's weights resolve (config files only, no weights read);
        load the preloaded names. The others load when their first job runs (``generate``)."""
        logging.getLogger("transformers.utils.import_utils").addFilter(pil_fallback_notice)
        if self.before_load is not None:
            self.before_load()
        self.device = pick_device(self._device_request)
        checked: set[str] = set()
        for model in self._registry:
            if model.weights not in checked:
                self._guard(model, self._check)
                checked.add(model.weights)
        for model in self._registry:
            if self._preload is None or model.name in self._preload:
                self._ensure(model.name)

    def _check(self, model: ModelSpec) -> None:
        check_weights(model.weights, local_files_only=self._local_files_only)
        pipeline_class_name(model.weights, model.kind, local_files_only=self._local_files_only, pipeline=model.pipeline)

    def _guard(self, model: ModelSpec, step: Callable[[ModelSpec], object]) -> object:
        try:
            return step(model)
        except Exception as exc:
            offline = " (offline: only local folders and the hub cache are used)" if self._local_files_only else ""
            raise RuntimeError(
                f"could not load weights {model.weights!r} for model {model.name!r}{offline}: {exc}"
            ) from exc

    def _ensure(self, name: str) -> Any:
        """The name's pipeline, loading it now if this is its first use. Names that share weights (flux-dev /
        flux-pro, kontext pro / max) share one loaded pipeline; under --compile a new one is warmed up first."""
        if name in self._pipes:
            return self._pipes[name]
        model = self._registry.get(name)
        key = (model.weights, model.kind, model.pipeline, model.upsampler)
        if key not in self._loaded:
            log.info("loading %s (%s) for %s on %s", model.weights, model.kind, model.name, self.device)
            started = time.monotonic()
            self._loaded[key] = self._guard(
                model,
                lambda m: load_pipeline(
                    m.weights,
                    m.kind,
                    device=self.device,
                    local_files_only=self._local_files_only,
                    speed=self.speed,
                    pipeline=m.pipeline,
                    lora_slots=self.lora_slots,
                    upsampler=m.upsampler,
                ),
            )
            log.info("loaded %s for %s in %.1f s", model.weights, model.name, time.monotonic() - started)
            self._pipes[name] = self._loaded[key]
            if self.speed.compile:
                self._warm_up(model)
        self._pipes[name] = self._loaded[key]
        return self._pipes[name]

    def _warm_up(self, model: ModelSpec) -> None:
        """Compile for each configured size now, so no user request pays for it."""
        from PIL import Image as PILImage

        gray = PILImage.new("RGB", (64, 64), (128, 128, 128))
        # Kontext with a reference image runs twice the tokens of one without: warm the shape edits use.
        # FLUX.2 serves text-to-image and edits alike: both shapes (one reference; more compile on first use).
        references = model.traits.warmup_references
        for (width, height), count in ((size, n) for size in self.speed.warmup_sizes for n in references):
            images = [gray.resize((width, height))] * count
            mask = PILImage.new("L", (width, height), 255) if model.traits.takes_mask else None
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
        other = for_kind(self._registry.get(model_name).kind).task_pipelines.get(task)
        if other is None:
            return pipe
        if (model_name, task) not in self._by_task:
            import diffusers

            # Same modules, no second copy of the weights.
            self._by_task[model_name, task] = getattr(diffusers, other).from_pipe(pipe)
            self._by_task[model_name, task].set_progress_bar_config(disable=True)
        return self._by_task[model_name, task]

    def generate(self, requests: Sequence[EngineRequest], on_step: OnStep) -> list[list[Image]]:
        import torch

        if not requests or len({r.spec.batch_key() for r in requests}) != 1:
            raise ValueError("generate() takes a non-empty batch of requests with the same spec.batch_key()")
        if self.step_delay_s:
            on_step = _paced(on_step, self.step_delay_s)
        first = requests[0].spec
        model = self._registry.get(first.model)
        self._ensure(first.model)
        pipe = self._pipeline(first.model, first.task)
        family = for_kind(model.kind)
        if family.generate is not None:
            return family.generate(pipe, model, list(requests), on_step)
        prompts = [r.spec.prompt for r in requests for _ in range(r.spec.num_images)]
        # CPU generators make a seed mean the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(s) for r in requests for s in r.spec.image_seeds()]

        preview_steps = first.preview_steps()

        def callback(pipeline: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            done = step + 1
            previews = None
            if done in preview_steps:
                previews = decode_preview(pipeline, tensors["latents"], first.height, first.width)
            try:
                on_step(done, first.steps, previews)
            except Cancelled:
                pipeline._interrupt = True
                raise
            return tensors

        kwargs: dict[str, Any] = {}
        if takes(pipe, "guidance_scale"):  # klein KV takes no guidance at all
            if first.guidance is not None:
                kwargs["guidance_scale"] = first.guidance
            elif model.traits.guidance_when_none is not None:
                kwargs["guidance_scale"] = model.traits.guidance_when_none
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


def _paced(on_step: OnStep, delay_s: float) -> OnStep:
    def paced(done: int, total: int, previews: list[Image] | None) -> None:
        time.sleep(delay_s)
        on_step(done, total, previews)

    return paced
