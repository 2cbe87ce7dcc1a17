"""DeviceWorker: runs the job it is handed on a device: claim, lease heartbeat, engine, storage, complete."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..engine.base import Cancelled, Engine, EngineRequest
from ..engine.safety import FLAGGED_CODE, SafetyChecker, Withheld
from ..errors import FluxServeError, GenerationFailed, OutOfMemory, StoreUnavailable
from ..job import Job, Output
from ..jobs import JobService
from ..loras import LoraLibrary
from ..models import ModelRegistry
from ..outputs import EXTENSIONS
from ..provenance import SOURCE_MARK, Ingredient, Provenance, SigningFailed, ingredient, source_key
from ..spec import GenerationSpec
from ..storage import Storage
from .leases import (
    PROVENANCE_CODE,
    PROVENANCE_FAILED,
    STORAGE_FAILED,
    AbortCheck,
    LeasedWorker,
    Lock,
    _ShuttingDown,
    default_batch_max_pixels,
)

log = logging.getLogger(__name__)


class DeviceWorker(LeasedWorker):
    """The only caller of its engine: pipelines are never called concurrently (one slot)."""

    concurrency = 1
    route = None  # runs jobs here, on its device

    def __init__(
        self,
        jobs: JobService,
        storage: Storage,
        engine: Engine,
        registry: ModelRegistry,
        *,
        max_batch: int = 1,
        batch_max_pixels: int | None = None,
        png_compress_level: int = 1,
        nice: int = 0,
        overlap_encoding: bool = True,
        loras: LoraLibrary | None = None,
        storage_retry_s: float = 60.0,
        idle_unload_s: float = 0.0,
        max_model_wait_s: float = 30.0,
        provenance: Provenance | None = None,
        safety: SafetyChecker | None = None,
    ) -> None:
        super().__init__(
            jobs, storage, getattr(engine, "device_request", engine.device), storage_retry_s=storage_retry_s
        )
        # Adapters an API node on another machine fetched are fetched again here (LoraLibrary.localize).
        self._loras = loras
        self._nice = nice
        # A queue task (fluxserve.queue.runner) must not return before its images are stored.
        self._may_overlap = overlap_encoding
        self._engine = engine
        self._idle_unload_s = idle_unload_s
        self.max_model_wait_s = max_model_wait_s
        self._registry = registry
        self._max_batch = max_batch
        self._png_level = png_compress_level
        self._provenance = provenance or Provenance.off()
        self._safety = safety
        self._batch_max_pixels = batch_max_pixels
        # On an accelerator, encoding and writing the images runs beside the next job's denoising: a
        # 1024x1024 PNG takes a good part of a schnell image's time. At most two batches wait for it.
        # On CPU the encoder would take cores from torch's threads (measured: 0.85x throughput at
        # 1024x1024 on 2 cores), so there it runs inline.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fluxserve-encode")
        self._overlap_encoding = False
        self._encode_slots = threading.Semaphore(2)
        self._abort: AbortCheck = lambda: None

    @property
    def device(self) -> str:
        return self._engine.device

    def stop(self, timeout: float = 10.0) -> None:
        self.begin_stop()
        self._encoder.shutdown(wait=True)  # generated images are written before the store closes
        super().stop(timeout)

    def models(self) -> list[str]:
        """The names this worker serves (its registry, narrowed by --models; never an upstream-only name)."""
        return [m.name for m in self._registry if m.is_local]

    def loaded_models(self) -> list[str]:
        return self._engine.loaded_models() if self.state == "ready" else []

    def engine_info(self) -> dict[str, Any]:
        return self._engine.info() if self.state == "ready" else {}

    # -- sharing the device ------------------------------------------------------

    @property
    def sleeping(self) -> bool:
        return self._engine.sleeping

    def sleep(self) -> None:
        """Off the device (waits for a running job to end); jobs stay queued until wake_up."""
        if self.state == "ready":
            self._engine.sleep()

    def wake_up(self) -> None:
        if self.state == "ready":
            self._engine.wake_up()

    def observe(self, loaded: Callable[[str, float], None], evicted: Callable[[str], None]) -> None:
        self._engine.on_load, self._engine.on_evict = loaded, evicted

    def idle(self) -> None:
        """--idle-unload: pipelines unused that long leave the device, but those queued jobs wait for."""
        if self._idle_unload_s <= 0 or self.state != "ready" or self._engine.sleeping:
            return
        try:
            waiting = self._jobs.queued_models(self.models())
        except StoreUnavailable:
            return  # unknown: unload nothing
        for name in self._engine.unload_idle(self._idle_unload_s, keep=waiting):
            log.info("%s unloaded after %g s idle", name, self._idle_unload_s)

    # -- the loop -------------------------------------------------------------

    def load(self) -> bool:
        try:
            self._engine.load()
            self._overlap_encoding = self._may_overlap and not self._engine.device.startswith("cpu")
            self.state = "ready"
        except Exception as exc:  # a bad weights path must not kill the server: health shows it, jobs fail
            log.exception("loading models failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.state = "error"
        return self.state == "ready"

    def run_claimed(self, job_id: str, lock: Lock | None = None, abort: AbortCheck | None = None) -> list[Job]:
        """Claim this queued job and run it with the compatible ones ``lock`` lets it take (a queue's rows).

        Returns the batch as claimed, lead first; empty when the job was no longer queued."""
        job = self._store(self._jobs.claim_id, job_id, self.worker_id)
        if job is None:
            return []
        batch = self._batch_for(job, lock)
        self.current_job = job.id
        self._abort = abort or (lambda: None)
        try:
            self._run_batch(batch)
        except StoreUnavailable:  # only when stopping: the jobs' leases run out and they run again
            log.warning("worker %s stopped before it could record its jobs' results", self.worker_id)
        finally:
            self.current_job = None
            self._abort = lambda: None
        return batch

    def lower_priority(self) -> None:
        """FLUXSERVE_WORKER_NICE: the calling thread and the torch threads it starts (they inherit it) yield
        the CPU to the HTTP server when both want it. Off by default; see the setting for what it costs."""
        if self._nice and hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
            except OSError as exc:
                log.info("could not lower the worker's priority: %s", exc)

    def _hold(self, batch: list[Job]) -> None:
        with self._held_lock:
            self._held.update((j.id, j) for j in batch)

    def _release(self, job: Job) -> None:
        """Stop renewing this claim; a later claim of the same job (a re-run on this worker) stays held."""
        with self._held_lock:
            current = self._held.get(job.id)
            if current is not None and current.attempts == job.attempts:
                del self._held[job.id]
                self._lost.discard(job.id)

    # -- one batch --------------------------------------------------------------

    def _batch_for(self, job: Job, lock: Callable[[Any, list[str]], list[str]] | None = None) -> list[Job]:
        """The claimed job plus compatible queued ones, never waiting for more to arrive."""
        spec = job.spec
        cap = self._batch_max_pixels
        small = spec.width * spec.height <= (default_batch_max_pixels(self._engine.device) if cap is None else cap)
        # FLUX 3's modular pipeline takes one prompt per call: its jobs run alone.
        one_prompt = spec.model in self._registry and self._registry.get(spec.model).traits.one_prompt_per_batch
        if not small or self._max_batch <= spec.num_images or spec.task != "text2img" or one_prompt:
            return [job]
        try:
            return [job, *self._jobs.claim_compatible(job, self.worker_id, self._max_batch, lock)]
        except StoreUnavailable:
            return [job]

    def _end(self, job: Job, outcome: Callable[[Job], bool]) -> None:
        """Write a job's end (fenced); a refused write means another claim owns it now."""
        try:
            if not self._store(outcome, job):
                log.warning("job %s: result not recorded, the claim was taken from worker %s", job.id, self.worker_id)
        finally:
            self._release(job)

    def _run_batch(self, batch: list[Job]) -> None:
        self._hold(batch)
        if self.state == "error":
            self._fail(batch, f"The model failed to load: {self.load_error}")
            return
        dropped: set[str] = set()  # canceled, past their deadline or no longer this worker's

        def on_step(done: int, total: int, previews: list[Image.Image] | None) -> None:
            abort = self._abort()
            if self._stopping.is_set() or abort == "shutdown":
                raise _ShuttingDown
            if abort == "user":  # the lead's queue entry was aborted; members' flags come with progress
                dropped.add(batch[0].id)
            self._save_previews(batch, done, previews or [], dropped)
            self._report_progress(batch, done, total, dropped)
            if len(dropped) == len(batch):
                raise Cancelled

        try:
            self._drop_stopped(batch, dropped)
            if len(dropped) == len(batch):
                raise Cancelled
            requests = [
                EngineRequest(
                    self._local_adapters(job.spec),
                    images=[self._load_input(key) for key in job.spec.images],
                    mask=self._load_input(job.spec.mask) if job.spec.mask else None,
                )
                for job in batch
            ]

            def noted(text: str) -> None:  # the job's logs and events say why its first step is late
                self._store(self._jobs.progress, batch, 0, 0, text)

            if (note := self._engine.load_note(batch[0].spec.model)) is not None:
                noted(note)
            self._engine.on_note = noted  # a download's progress, while the engine fetches the weights
            results = self._engine.generate(requests, on_step)
            self._encode_slots.acquire()
            # Once stopping, the encoder may already be shut down: finish here.
            prompts = [r.revised_prompt for r in requests]
            if self._overlap_encoding and not self._stopping.is_set():
                self._encoder.submit(self._finish_batch, batch, results, dropped, prompts)
            else:
                self._finish_batch(batch, results, dropped, prompts)
        except Cancelled:
            for job in batch:
                self._end_dropped(job)
        except _ShuttingDown:
            # A clean stop is not the job's fault: give the attempt back and run it after restart.
            for job in batch:
                self._end(job, lambda j: self._jobs.requeue(j, "shutdown", give_back_attempt=True))
            log.info("jobs %s re-queued by shutdown", [j.id for j in batch])
        except OutOfMemory as exc:
            if len(batch) > 1:
                # Batching is ours, not the clients': each job gets its own try at its own size.
                log.warning("batch of %d jobs ran out of memory; running them one by one", len(batch))
                for job in batch:
                    self._run_batch([job])
                return
            self._fail(batch, exc.message)
        except (OSError, UnidentifiedImageError) as exc:  # an input file gone or unreadable
            log.exception("jobs %s: reading inputs failed", [j.id for j in batch])
            self._fail(batch, f"The server could not read the input images: {exc}")
        except FluxServeError as exc:
            self._fail(batch, exc.message)
        except Exception as exc:  # the worker must outlive any one job
            log.exception("jobs %s failed", [j.id for j in batch])
            self._fail(batch, f"Generation failed: {type(exc).__name__}: {exc}")

    def _local_adapters(self, spec: GenerationSpec) -> GenerationSpec:
        if not spec.loras or self._loras is None:
            return spec
        return replace(spec, loras=self._loras.localize(spec.loras, self._registry.get(spec.model)))

    def _fail(self, batch: list[Job], message: str, code: str | None = None) -> None:
        for job in batch:
            self._end(job, lambda j: self._jobs.fail(j, message, code=code))

    def _drop_stopped(self, batch: list[Job], dropped: set[str]) -> None:
        """Jobs to stop working on: canceled, past their Cancel-After deadline, or whose lease was lost.

        ``batch`` holds the jobs as last read (claim, then each step's progress write)."""
        now = time.time()
        with self._held_lock:
            dropped |= self._lost & {j.id for j in batch}
        for job in batch:
            if job.cancel_requested or (job.deadline is not None and now > job.deadline):
                dropped.add(job.id)

    def _end_dropped(self, job: Job) -> None:
        with self._held_lock:
            lost = job.id in self._lost
        if lost:
            self._release(job)
        else:
            self._end(job, self._jobs.finish_canceled)

    def _report_progress(self, batch: list[Job], done: int, total: int, dropped: set[str]) -> None:
        """One write for the batch's progress, which also reads back cancellations and lost claims.

        Best effort: while the store is unavailable the jobs run on, and the next step tries again."""
        live = [j for j in batch if j.id not in dropped]
        try:
            current = self._jobs.progress(live, done, total)
        except StoreUnavailable as exc:
            self.degrade(exc.message)
            current = list(live)
        lost = {job.id for job, now in zip(live, current, strict=True) if now is None}
        if lost:
            with self._held_lock:
                self._lost |= lost
            dropped |= lost
        self._drop_stopped([now for now in current if now is not None], dropped)

    def _save_previews(self, batch: list[Job], done: int, previews: list[Image.Image], dropped: set[str]) -> None:
        offset = 0
        for job in batch:
            mine = previews[offset : offset + job.spec.num_images]
            offset += job.spec.num_images
            if job.id in dropped:
                continue
            for i, preview in enumerate(mine):
                key = f"{job.id}/preview-{done}-{i}.png"
                buf = io.BytesIO()
                preview.save(buf, format="PNG", compress_level=1)
                try:
                    self._storage.put(key, buf.getvalue())
                    self._jobs.add_preview(job, key)
                except StoreUnavailable as exc:
                    self.degrade(exc.message)
                except OSError as exc:  # a preview that could not be written is skipped, the image is not
                    log.warning("job %s: preview not stored: %s", job.id, exc)

    def _finish_batch(
        self, batch: list[Job], results: list[list[Image.Image]], dropped: set[str], prompts: list[str | None]
    ) -> None:
        """Each job's images encoded, stored and the job completed (on the encoder thread on a GPU)."""
        try:
            for job, images, revised in zip(batch, results, prompts, strict=True):
                if job.id in dropped:  # dropped mid-batch: the others' call ran on, its images are not kept
                    self._end_dropped(job)
                    continue
                if self._withheld(job, images):
                    continue
                try:
                    encode_start = time.monotonic()
                    outputs = self._save_outputs(job, images, revised)
                    encode_s = time.monotonic() - encode_start
                except SigningFailed as exc:  # never an unmarked image: the job fails, saying why
                    log.error("job %s: %s", job.id, exc)
                    self._fail([job], f"{PROVENANCE_FAILED}: {exc}", PROVENANCE_CODE)
                    continue
                except OSError as exc:  # disk full, permissions: this job fails, the worker goes on
                    log.error("job %s: storing the images failed: %s", job.id, exc)
                    self._fail([job], f"{STORAGE_FAILED} ({exc.strerror or exc or type(exc).__name__}).")
                    continue
                except Exception as exc:
                    log.exception("job %s: encoding the images failed", job.id)
                    self._fail([job], f"{STORAGE_FAILED}: {type(exc).__name__}: {exc}")
                    continue
                mark = self._provenance.mark(job.id)
                self._end(job, lambda j, o=outputs, e=encode_s, m=mark: self._jobs.complete(j, o, encode_s=e, mark=m))  # type: ignore[misc]
        except StoreUnavailable:
            log.warning("stopping with jobs %s unrecorded; their leases will expire", [j.id for j in batch])
            for job in batch:
                self._release(job)
        finally:
            self._encode_slots.release()

    def _withheld(self, job: Job, images: list[Image.Image]) -> bool:
        """The safety check (when configured): a flagged job fails with the checker's reason, nothing stored."""
        if self._safety is None:
            return False
        try:
            self._safety.check(images, job.spec.safety_tolerance)
        except Withheld as exc:
            log.info("job %s: withheld by the safety check", job.id)
            self._fail([job], str(exc), FLAGGED_CODE)
            return True
        except GenerationFailed as exc:  # the classifier could not load or run: never shipped unchecked
            self._fail([job], exc.message)
            return True
        return False

    def _load_input(self, key: str) -> Image.Image:
        with Image.open(io.BytesIO(self._storage_io(self._storage.read, key))) as img:
            img.load()
            return img

    def _save_outputs(self, job: Job, images: list[Image.Image], revised: str | None = None) -> list[Output]:
        spec = job.spec
        model = self._registry.get(spec.model)
        outputs = []
        inputs: tuple[Ingredient, ...] = ()
        if self._provenance.enabled:  # an edit's manifest lists the client's images as its ingredients
            keys = [*spec.images, *([spec.mask] if spec.mask else [])]
            # An input that came with its own manifest: the file as sent (kept beside it), so that manifest stays.
            sources = [source_key(k) if k.endswith(SOURCE_MARK + ".png") else k for k in keys]
            inputs = tuple(ingredient(self._storage_io(self._storage.read, k), k.rsplit("/", 1)[-1]) for k in sources)
        for i, (image, seed) in enumerate(zip(images, spec.image_seeds(), strict=True)):
            key = f"{job.id}/out-{i}.{EXTENSIONS[spec.output_format]}"
            meta: dict[str, object] = {"prompt": spec.prompt, "seed": seed, "model": model.label, "steps": spec.steps}
            if revised is not None:
                meta["revised_prompt"] = revised
            if spec.guidance is not None:
                meta["guidance"] = spec.guidance
            if spec.loras:  # what the image was made with: each adapter as asked for, its file's hash, its scale
                meta["loras"] = [{"source": a.source, "sha256": a.digest, "scale": a.scale} for a in spec.loras]
            data = self._provenance.output(
                image,
                job.id,
                fmt=spec.output_format,
                quality=spec.quality,
                meta=meta,
                png_level=self._png_level,
                model=spec.model,
                prompt=spec.prompt,
                inputs=inputs,
            )
            self._storage_io(self._storage.put, key, data)
            outputs.append(Output(key, seed, image.width, image.height, spec.output_format, revised))
        return outputs
