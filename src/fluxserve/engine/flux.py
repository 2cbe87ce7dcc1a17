"""DiffusersEngine: real diffusers FLUX pipelines, loaded when first needed within a memory budget (engine.memory),
called by one worker thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from PIL.Image import Image

from ..errors import GenerationFailed
from ..models import ModelRegistry, ModelSpec
from ..sizes import human_bytes
from .base import EngineRequest, OnStep
from .classic import run_classic
from .common import check_weights, pil_fallback_notice
from .downloads import Downloads
from .families import for_kind
from .inventory import Part, folder_of, inventory, is_hub_id
from .listing import listed
from .loading import load_pipeline, pick_device, pipeline_class_name, warmup_requests
from .lora import AdapterSlots, HotswapSlots
from .memory import Entry, Pool, default_budgets, measured
from .speed import SpeedOptions, resolve_attention

log = logging.getLogger(__name__)


LoadKey = tuple[str, str, str, str]  # (weights, kind, pipeline, upsampler): names with one key share a pipeline


def key_of(model: ModelSpec) -> LoadKey:
    return (model.weights, model.kind, model.pipeline, model.upsampler)


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
        memory_budget: int | None = None,
        cpu_memory_budget: int | None = None,
    ) -> None:
        self.speed = speed or SpeedOptions()
        self.step_delay_s = step_delay_s  # the demo's: a pause after each step, so a job takes a while
        self.lora_slots = lora_slots
        self._adapters: dict[int, AdapterSlots | HotswapSlots] = {}  # by id() of the transformer the adapters live in
        self._registry = registry
        self._device_request = device
        self._local_files_only = local_files_only
        self._pipes: dict[str, Any] = {}  # pipelines handed in whole (use_pipeline), outside the memory ledger
        # Names loaded at start and never moved (None: every name); the rest load when their first job runs.
        self._preload = None if preload is None else set(preload)
        self._budgets = (memory_budget, cpu_memory_budget)
        self._parts: dict[LoadKey, list[Part] | None] = {}  # each pipeline's components, known before loading
        self.pool = Pool("cpu", 0, 0)  # the real one is made by load(), once the device is known
        self.loading: set[str] = set()  # names whose weights are being read now
        self.lock = threading.RLock()  # generate, sleep and idle unload take turns
        self.sleeping = False
        self._awake = threading.Event()
        self._by_task: dict[tuple[str, str], Any] = {}  # (name, task): another class over the same modules
        self.device = "unloaded"
        self.device_request = device  # what the operator asked for: names the worker before loading
        # Work that must happen before weights load, off the request path (building the demo model).
        self.before_load: Callable[[], object] | None = None
        self.on_load: Callable[[str, float], None] = lambda name, seconds: None  # metrics
        self.on_evict: Callable[[str], None] = lambda name: None
        # What the running job's log says while it waits (a download's progress); its worker sets it.
        self.on_note: Callable[[str], None] = lambda text: None
        self.downloads = Downloads()
        self.missing: dict[str, str] = {}  # names whose hub weights are not here while offline: why

    def load(self) -> None:
        """Pick the device and check every name's weights resolve (config files and safetensors headers, no
        weights read); refuse a name that could never fit the memory budget; load the preloaded names. The
        others load when their first job runs (``generate``)."""
        logging.getLogger("transformers.utils.import_utils").addFilter(pil_fallback_notice)
        if self.before_load is not None:
            self.before_load()
        self.device = pick_device(self._device_request)
        budget, cpu_budget = default_budgets(self.device)
        self.pool = Pool(
            self.device,
            budget if self._budgets[0] is None else self._budgets[0],
            cpu_budget if self._budgets[1] is None else self._budgets[1],
        )
        self.pool.on_drop = self._forget
        self.pool.on_evict = self._evicted
        item_bytes = 4 if self.device == "cpu" else 2  # float32 on CPUs, bfloat16 elsewhere (load_pipeline)
        for model in self._registry:
            if key_of(model) not in self._parts:
                if not self._checked(model):
                    continue
                extra = {"prompt_upsampler": model.upsampler} if model.upsampler else None
                parts = inventory(model.weights, item_bytes, extra=extra)
                if parts is None and not extra and not self._local_files_only and is_hub_id(model.weights):
                    parts = self._listed(model, item_bytes)
                self._parts[key_of(model)] = parts
                self._check_fits(model)
        for model in self._registry:
            if self._preload is None or model.name in self._preload:
                self._guard(model, lambda m: self._ensure(m.name))

    def _check(self, model: ModelSpec) -> None:
        check_weights(model.weights, local_files_only=self._local_files_only)
        pipeline_class_name(model.weights, model.kind, local_files_only=self._local_files_only, pipeline=model.pipeline)

    def _checked(self, model: ModelSpec) -> bool:
        """Whether the weights resolve. A wrong local path or a hub id that does not exist stops the start; a
        hub id not in the cache while offline only makes that name's jobs fail, saying which weights to fetch."""
        try:
            self._guard(model, self._check)
            return True
        except RuntimeError as exc:
            if not (self._local_files_only and is_hub_id(model.weights)):
                raise
            for name in self._names(key_of(model)):
                self.missing[name] = (
                    f"The weights of {name} ({model.weights}) are not in the hub cache and this server is offline "
                    f"(HF_HUB_OFFLINE / --demo): download them first (huggingface-cli download {model.weights}). "
                    f"{exc.__cause__ or exc}"
                )
            log.warning("%s", self.missing[model.name])
            return False

    @staticmethod
    def _listed(model: ModelSpec, item_bytes: int) -> list[Part] | None:
        """Sized from the hub's listing and headers before downloading; None when the hub cannot say (it is
        then sized once downloaded, and a name too big for the budget is refused by its first job)."""
        try:
            return listed(model.weights, item_bytes)
        except Exception as exc:  # an unreachable hub must not stop the start: the weights may come later
            log.warning("could not size %s from the hub before downloading it: %s", model.weights, exc)
            return None

    def _check_fits(self, model: ModelSpec) -> None:
        """A name whose pipeline can never be resident within the budget, even offloaded, stops the start."""
        parts = self._parts[key_of(model)] or []
        mode = self.speed.offload if self.device != "cpu" else "none"
        offload = "model" if mode == "auto" else mode
        alone = Entry(key=None, pipe=None, parts={p.name: p for p in parts}, offload=offload)
        need = sum(p.nbytes for p in alone.resident())
        if need > self.pool.budget:
            how = "" if mode == "none" else f" even with --offload {mode}"
            raise RuntimeError(
                f"model {model.name!r} ({model.weights}) needs {human_bytes(need)} on the device{how}; the memory "
                f"budget is {human_bytes(self.pool.budget)} (--memory-budget)"
            )

    def _guard(self, model: ModelSpec, step: Callable[[ModelSpec], object]) -> object:
        try:
            return step(model)
        except Exception as exc:
            offline = " (offline: only local folders and the hub cache are used)" if self._local_files_only else ""
            raise RuntimeError(
                f"could not load weights {model.weights!r} for model {model.name!r}{offline}: {exc}"
            ) from exc

    def _ensure(self, name: str) -> Any:
        """The name's pipeline on the device, loading it (or warming it from the CPU tier) if it is not there,
        after making room. Names that share weights (flux-dev / flux-pro) share one pipeline, and pipelines
        share components that are the same weights; under --compile a new pipeline is warmed up first."""
        if name in self._pipes:
            return self._pipes[name]
        if name in self.missing:
            raise GenerationFailed(self.missing[name])
        model = self._registry.get(name)
        key = key_of(model)
        entry = self.pool.entries.get(key)
        if entry is not None and entry.on_device:
            self.pool.touch(key)
            return entry.pipe
        self.loading.add(name)
        started = time.monotonic()
        try:
            if entry is not None:
                self.pool.make_room(list(entry.parts.values()), entry.offload, for_key=key, label=name)
                if entry.offload == "none":
                    entry.pipe.to(self.device)
                    upsampling = getattr(entry.pipe, "fluxserve_upsampling", None)
                    if upsampling is not None:
                        upsampling.prompt_upsampler.to(self.device)
                entry.on_device = True
                self.pool.touch(key)
                log.info("%s back on %s from host memory in %.2f s", name, self.device, time.monotonic() - started)
            else:
                entry = self._load(model, key)
        finally:
            self.loading.discard(name)
        self.on_load(name, time.monotonic() - started)
        return entry.pipe

    def _load(self, model: ModelSpec, key: LoadKey) -> Entry:
        parts = self._parts.get(key)
        if not self._local_files_only and is_hub_id(model.weights) and self._fetch(model):
            # Sized again from the files now here (a listing's figures are the same by construction).
            extra = {"prompt_upsampler": model.upsampler} if model.upsampler else None
            parts = self._parts[key] = inventory(model.weights, 4 if self.device == "cpu" else 2, extra=extra)
        offload = "none" if self.device == "cpu" or self.speed.offload == "auto" else self.speed.offload
        self.pool.make_room(parts or [], offload, for_key=key, label=model.name)
        reuse = self.pool.shared(parts or []) if offload == "none" else {}
        shared = ", ".join(sorted(reuse)) or "none"
        log.info("loading %s (%s) for %s; already loaded: %s", model.weights, model.kind, model.name, shared)
        started = time.monotonic()
        pipe: Any = self._guard(
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
                reuse=reuse,
            ),
        )
        pinned = self._preload is None or any(n in self._preload for n in self._names(key))
        entry = Entry(key, pipe, measured(key, pipe, parts), offload=pipe.fluxserve_offload, pinned=pinned)
        self.pool.add(entry)
        # Sized only now when its files could not be read first: older entries make room after the fact.
        self.pool.make_room([], "none", for_key=key, label=model.name)
        log.info("loaded %s for %s in %.1f s", model.weights, model.name, time.monotonic() - started)
        if self.speed.compile:
            self._warm_up(model)
        return entry

    def _fetch(self, model: ModelSpec) -> bool:
        """Download the weights not here yet, the job's log following along; whether anything was fetched."""
        fetched = False
        for repo in [model.weights, *([model.upsampler] if is_hub_id(model.upsampler) else [])]:
            if folder_of(repo) is not None and inventory(repo, 2) is not None:
                continue
            try:
                self.downloads.fetch(repo, lambda p: self.on_note(p.line(model.name)))
            except Exception as exc:
                raise GenerationFailed(f"could not download {repo} for {model.name}: {exc}") from exc
            fetched = True
        return fetched

    def _names(self, key: object) -> list[str]:
        return [m.name for m in self._registry if key_of(m) == key]

    def _forget(self, entry: Entry) -> None:
        """A pipeline left memory: what was built over its modules goes with it."""
        names = set(self._names(entry.key))
        self._by_task = {k: v for k, v in self._by_task.items() if k[0] not in names}
        transformer = getattr(entry.pipe, "transformer", None)
        if transformer is not None:
            self._adapters.pop(id(transformer), None)

    def _evicted(self, entry: Entry) -> None:
        for name in self._names(entry.key):
            self.on_evict(name)

    def _warm_up(self, model: ModelSpec) -> None:
        """Compile for each configured size now, so no user request pays for it."""
        for request in warmup_requests(model, self.speed.warmup_sizes):
            self.generate([request], lambda d, t, p: None)

    def info(self) -> dict[str, Any]:
        resident = [e.pipe for e in self.pool.all() if e.on_device] + list(self._pipes.values())
        pipes = list({id(p): p for p in resident}.values())
        return {
            "device": self.device,
            "attention": resolve_attention(self.speed.attention, self.device) if pipes else self.speed.attention,
            "compile": self.speed.compile,
            "offload": sorted({getattr(p, "fluxserve_offload", "none") for p in pipes}),
            "lossy_modes": self.speed.lossy,
            "memory": self.memory(),
            "downloads": {
                repo: {"done_bytes": p.done_bytes, "total_bytes": p.total_bytes}
                for repo, p in list(self.downloads.active.items())
            },
            **({"unavailable": dict(self.missing)} if self.missing else {}),
            "sleeping": self.sleeping,
            "models": self.model_states(),
        }

    def memory(self) -> dict[str, int]:
        return {
            "budget_bytes": self.pool.budget,
            "used_bytes": self.pool.used_bytes(),
            "cpu_budget_bytes": self.pool.cpu_budget,
            "cpu_used_bytes": self.pool.cpu_bytes(),
        }

    def model_states(self) -> dict[str, dict[str, Any]]:
        """Each local name: "unloaded", "loading" or "ready", and the bytes its pipeline takes on the device."""
        out: dict[str, dict[str, Any]] = {}
        for model in self._registry:
            if not model.is_local:
                continue
            entry = self.pool.entries.get(key_of(model))
            parts = list(entry.parts.values()) if entry is not None else self._parts.get(key_of(model))
            state = "ready" if (entry is not None and entry.on_device) or model.name in self._pipes else "unloaded"
            out[model.name] = {
                "state": "loading" if model.name in self.loading else state,
                "memory_bytes": None if parts is None else sum(p.nbytes for p in parts),
            }
        return out

    def pipeline(self, name: str) -> Any:
        """The name's pipeline if it is on the device now, else None."""
        if name in self._pipes:
            return self._pipes[name]
        entry = self.pool.entries.get(key_of(self._registry.get(name)))
        return entry.pipe if entry is not None and entry.on_device else None

    def load_note(self, name: str) -> str | None:
        if name in self._pipes or name not in self._registry:
            return None
        entry = self.pool.entries.get(key_of(self._registry.get(name)))
        if entry is not None and entry.on_device:
            return None
        if entry is not None:
            total = sum(p.nbytes for p in entry.parts.values())
            return f"loading {name}: {human_bytes(total)} back from host memory"
        parts = self._parts.get(key_of(self._registry.get(name)))
        if parts is None:
            return f"loading {name}: its size is known once loaded"
        need, total = self.pool.need(parts), sum(p.nbytes for p in parts)
        shared = f" ({human_bytes(total - need)} of it already loaded for other models)" if need < total else ""
        return f"loading {name}: {human_bytes(need)} of {human_bytes(total)} to read{shared}"

    def loaded_models(self) -> list[str]:
        on_device = {e.key for e in self.pool.all() if e.on_device}
        return [m.name for m in self._registry if key_of(m) in on_device] + [n for n in self._pipes]

    # -- sharing the device ------------------------------------------------------

    def sleep(self) -> None:
        """Everything off the device (to the host tier, within its budget), preloaded names too; generate()
        waits until wake_up(). Waits for a running job to end first."""
        self.sleeping = True  # first: a job claimed from now waits in generate() instead of loading
        self._awake.clear()
        with self.lock:
            for entry in [e for e in self.pool.all() if e.on_device]:
                self.pool.to_tier(entry)

    def wake_up(self) -> None:
        """Back to work: the preloaded names return to the device now, the others on their next job."""
        with self.lock:
            self.sleeping = False
            self._awake.set()
            for model in self._registry:
                if model.is_local and (self._preload is None or model.name in self._preload):
                    self._ensure(model.name)

    def unload_idle(self, idle_s: float, keep: Collection[str] = ()) -> list[str]:
        """Names whose pipeline sat unused ``idle_s`` seconds moved off the device (never a preloaded one, nor
        one a queued job in ``keep`` waits for); returns them."""
        if idle_s <= 0 or not self.lock.acquire(blocking=False):
            return []  # busy: nothing is idle
        try:
            now = time.monotonic()
            kept = {key_of(self._registry.get(n)) for n in keep if n in self._registry}
            idle = [
                e
                for e in self.pool.all()
                if e.on_device and not e.pinned and e.key not in kept and now - e.last_used >= idle_s
            ]
            for entry in idle:
                self.pool.to_tier(entry)
            return [n for e in idle for n in self._names(e.key)]
        finally:
            self.lock.release()

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
        pipe = self._ensure(model_name)
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
        """One call; one at a time, so nothing is moved off the device while a job runs on it. While the
        engine sleeps it waits for wake_up (a job claimed as sleep began)."""
        while self.sleeping:
            self._awake.wait(0.5)
        with self.lock:
            return self._generate(requests, on_step)

    def _generate(self, requests: Sequence[EngineRequest], on_step: OnStep) -> list[list[Image]]:
        if not requests or len({r.spec.batch_key() for r in requests}) != 1:
            raise ValueError("generate() takes a non-empty batch of requests with the same spec.batch_key()")
        if self.step_delay_s:
            on_step = _paced(on_step, self.step_delay_s)
        first = requests[0].spec
        model = self._registry.get(first.model)
        pipe = self._pipeline(first.model, first.task)
        family = for_kind(model.kind)
        if family.generate is not None:
            return family.generate(pipe, model, list(requests), on_step)
        # Hot-swap slots always take part (unused ones are zeroed); plain slots only when asked for.
        uses_slots = first.loras or hasattr(pipe.transformer, "fluxserve_hotswap")
        return run_classic(pipe, model, list(requests), on_step, self.adapter_slots(pipe) if uses_slots else None)


def _paced(on_step: OnStep, delay_s: float) -> OnStep:
    def paced(done: int, total: int, previews: list[Image] | None) -> None:
        time.sleep(delay_s)
        on_step(done, total, previews)

    return paced
