"""Dispatchers run queued jobs. LocalDispatcher: one in-process worker thread that owns the engine."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol

from PIL import Image

from .engine.base import Cancelled, Engine, EngineRequest
from .errors import FluxServeError, OutOfMemory
from .jobs import Job, JobEvent, JobService, Output, Status
from .models import ModelRegistry
from .outputs import EXTENSIONS, encode_image
from .storage import Storage
from .store import Store

log = logging.getLogger(__name__)

WorkerState = Literal["loading", "ready", "error", "stopped"]


class Dispatcher(Protocol):
    @property
    def state(self) -> WorkerState: ...
    @property
    def load_error(self) -> str | None: ...

    def start(self) -> None: ...
    def wake(self) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...
    def loaded_models(self) -> list[str]: ...


class _ShuttingDown(Exception):
    pass


class LocalDispatcher:
    """The only caller of the engine: pipelines are never called concurrently."""

    def __init__(
        self,
        store: Store,
        storage: Storage,
        engine: Engine,
        registry: ModelRegistry,
        *,
        max_batch: int = 1,
        batch_max_pixels: int = 320 * 320,
        png_compress_level: int = 1,
    ) -> None:
        self._max_batch = max_batch
        self._png_level = png_compress_level
        # On an accelerator, encoding and writing the images runs beside the next job's denoising: a
        # 1024x1024 PNG takes a good part of a schnell image's time. At most two batches wait for it.
        # On CPU the encoder would take cores from torch's threads (measured: 0.85x throughput at
        # 1024x1024 on 2 cores), so there it runs inline.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fluxserve-encode")
        self._overlap_encoding = False
        self._encode_slots = threading.Semaphore(2)
        self._batch_max_pixels = batch_max_pixels
        self._store = store
        self._storage = storage
        self._engine = engine
        self._registry = registry
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.service: JobService | None = None
        self.state: WorkerState = "loading"
        self.load_error: str | None = None
        # In a pool, a worker whose models failed to load leaves jobs to the healthy ones.
        self.others_healthy: Callable[[], bool] = lambda: False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fluxserve-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._encoder.shutdown(wait=True)  # generated images are written before the store closes
        self.state = "stopped"

    def loaded_models(self) -> list[str]:
        return self._engine.loaded_models() if self.state == "ready" else []

    def engine_info(self) -> dict[str, Any]:
        info = getattr(self._engine, "info", None)
        return info() if info is not None and self.state == "ready" else {}

    def _run(self) -> None:
        try:
            self._engine.load()
            self._overlap_encoding = not str(getattr(self._engine, "device", "cpu")).startswith("cpu")
            self.state = "ready"
        except Exception as exc:  # a bad weights path must not kill the server: health shows it, jobs fail
            log.exception("loading models failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.state = "error"
        while not self._stopping.is_set():
            for job_id in self._store.abort_expired(time.time()):
                self._notify(job_id, "completed")
            if self.state == "error" and self.others_healthy():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            job = self._store.claim_next()
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self._run_job(job)

    def _notify(self, job_id: str, event: JobEvent = "update") -> None:
        if self.service is not None:
            self.service.notify(job_id, event)

    def _load_input(self, key: str) -> Image.Image:
        with Image.open(self._storage.open(key)) as img:
            img.load()
            return img

    def _batch_for(self, job: Job) -> list[Job]:
        """The claimed job plus compatible queued ones, never waiting for more to arrive."""
        spec = job.spec
        small = spec.width * spec.height <= self._batch_max_pixels
        if not small or self._max_batch <= spec.num_images or spec.task != "text2img":
            return [job]
        return [job, *self._store.claim_compatible(job, self._max_batch)]

    def _run_job(self, first: Job) -> None:
        batch = self._batch_for(first)
        for job in batch:
            self._notify(job.id, "start")
        self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        if self.state == "error":
            for job in batch:
                self._store.finish(job.id, Status.FAILED, error=f"The model failed to load: {self.load_error}")
                self._notify(job.id, "completed")
            return
        canceled: set[str] = set()

        def on_step(done: int, total: int, previews: list[Image.Image] | None) -> None:
            if self._stopping.is_set():
                raise _ShuttingDown
            for job in batch:
                if job.id not in canceled and (
                    self._store.is_cancel_requested(job.id) or (job.deadline is not None and time.time() > job.deadline)
                ):
                    canceled.add(job.id)
            if len(canceled) == len(batch):
                raise Cancelled
            offset = 0
            for job in batch:
                if job.id not in canceled:
                    self._store.update_progress(job.id, done, total)
                    for i, preview in enumerate((previews or [])[offset : offset + job.spec.num_images]):
                        self._save_preview(job, done, i, preview)
                    self._notify(job.id, "logs")
                offset += job.spec.num_images

        try:
            canceled.update(j.id for j in batch if self._store.is_cancel_requested(j.id))
            if len(canceled) == len(batch):
                raise Cancelled
            requests = [
                EngineRequest(
                    job.spec,
                    images=[self._load_input(key) for key in job.spec.images],
                    mask=self._load_input(job.spec.mask) if job.spec.mask else None,
                )
                for job in batch
            ]
            results = self._engine.generate(requests, on_step)
            self._encode_slots.acquire()
            # Once stopping, the encoder may already be shut down: finish here.
            if self._overlap_encoding and not self._stopping.is_set():
                self._encoder.submit(self._finish_batch, batch, results, canceled)
            else:
                self._finish_batch(batch, results, canceled)
            return
        except Cancelled:
            for job in batch:
                self._store.finish(job.id, Status.CANCELED, error="canceled")
        except _ShuttingDown:
            # A clean stop is not the job's fault: give the attempt back and run it after restart.
            for job in batch:
                self._store.requeue(job.id)
                self._notify(job.id)
            log.info("jobs %s re-queued by shutdown", [j.id for j in batch])
            return
        except OutOfMemory as exc:
            if len(batch) > 1:
                # Batching is ours, not the clients': each job gets its own try at its own size.
                log.warning("batch of %d jobs ran out of memory; running them one by one", len(batch))
                for job in batch:
                    self._run_batch([job])
                return
            self._store.finish(batch[0].id, Status.FAILED, error=exc.message)
        except FluxServeError as exc:
            for job in batch:
                self._store.finish(job.id, Status.FAILED, error=exc.message)
        except Exception as exc:  # the worker must outlive any one job
            log.exception("jobs %s failed", [j.id for j in batch])
            for job in batch:
                self._store.finish(job.id, Status.FAILED, error=f"Generation failed: {type(exc).__name__}: {exc}")
        for job in batch:
            self._notify(job.id, "completed")

    def _finish_batch(self, batch: list[Job], results: list[list[Image.Image]], canceled: set[str]) -> None:
        """On the encoder thread: each job's images encoded, stored and the job finished."""
        try:
            for job, images in zip(batch, results, strict=True):
                try:
                    if job.id in canceled:  # canceled mid-batch: the others' call ran on, its images are dropped
                        self._store.finish(job.id, Status.CANCELED, error="canceled")
                    else:
                        self._store.finish(job.id, Status.SUCCEEDED, outputs=self._save_outputs(job, images))
                        self._notify(job.id, "output")
                except Exception as exc:  # one job's storage failure must not take the others or the thread
                    log.exception("storing the outputs of job %s failed", job.id)
                    self._store.finish(job.id, Status.FAILED, error=f"Storing the images failed: {exc}")
                self._notify(job.id, "completed")
        finally:
            self._encode_slots.release()

    def _save_preview(self, job: Job, step: int, index: int, preview: Image.Image) -> None:
        key = f"{job.id}/preview-{step}-{index}.png"
        buf = io.BytesIO()
        preview.save(buf, format="PNG", compress_level=1)
        self._storage.put(key, buf.getvalue())
        self._store.add_preview(job.id, key)

    def _save_outputs(self, job: Job, images: list[Image.Image]) -> list[Output]:
        spec = job.spec
        model = self._registry.get(spec.model)
        outputs = []
        for i, (image, seed) in enumerate(zip(images, spec.image_seeds(), strict=True)):
            key = f"{job.id}/out-{i}.{EXTENSIONS[spec.output_format]}"
            meta: dict[str, object] = {"prompt": spec.prompt, "seed": seed, "model": model.label, "steps": spec.steps}
            if spec.guidance is not None:
                meta["guidance"] = spec.guidance
            data = encode_image(image, spec.output_format, spec.quality, meta, png_compress_level=self._png_level)
            self._storage.put(key, data)
            outputs.append(Output(key, seed, image.width, image.height, spec.output_format))
        return outputs


class WorkerPool:
    """One LocalDispatcher per device, all claiming from the same store; one Dispatcher to the app."""

    def __init__(self, workers: Sequence[LocalDispatcher]) -> None:
        self.workers = list(workers)
        for w in self.workers:
            w.others_healthy = lambda w=w: any(o.state in ("loading", "ready") for o in self.workers if o is not w)  # type: ignore[misc]

    @property
    def service(self) -> JobService | None:
        return self.workers[0].service

    @service.setter
    def service(self, value: JobService | None) -> None:
        for w in self.workers:
            w.service = value

    @property
    def state(self) -> WorkerState:
        states = [w.state for w in self.workers]
        if "ready" in states and "loading" not in states:
            return "ready"
        if "loading" in states:
            return "loading"
        return "error" if "error" in states else "stopped"

    @property
    def load_error(self) -> str | None:
        errors = [f"{i}: {w.load_error}" for i, w in enumerate(self.workers) if w.load_error]
        return "; ".join(errors) or None

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def wake(self) -> None:
        for w in self.workers:
            w.wake()

    def stop(self, timeout: float = 10.0) -> None:
        for w in self.workers:
            w._stopping.set()
            w.wake()
        for w in self.workers:
            w.stop(timeout)

    def loaded_models(self) -> list[str]:
        return sorted({m for w in self.workers for m in w.loaded_models()})

    def engine_info(self) -> dict[str, Any]:
        infos = [w.engine_info() | {"state": w.state} for w in self.workers]
        return infos[0] if len(infos) == 1 else {"workers": infos}
