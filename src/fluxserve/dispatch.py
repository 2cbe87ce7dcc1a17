"""Dispatchers run queued jobs. LocalDispatcher: one in-process worker thread that owns the engine."""

from __future__ import annotations

import io
import logging
import threading
import time
from typing import Literal, Protocol

from PIL import Image

from .engine.base import Cancelled, Engine, EngineRequest
from .errors import FluxServeError
from .jobs import Job, JobEvent, JobService, Output, Status
from .models import ModelRegistry
from .outputs import EXTENSIONS, encode_image
from .storage import Storage
from .store import Store

log = logging.getLogger(__name__)

WorkerState = Literal["loading", "ready", "error", "stopped"]


class Dispatcher(Protocol):
    state: WorkerState
    load_error: str | None

    def start(self) -> None: ...
    def wake(self) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...
    def loaded_models(self) -> list[str]: ...


class _ShuttingDown(Exception):
    pass


class LocalDispatcher:
    """The only caller of the engine: pipelines are never called concurrently."""

    def __init__(self, store: Store, storage: Storage, engine: Engine, registry: ModelRegistry) -> None:
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
        self.state = "stopped"

    def loaded_models(self) -> list[str]:
        return self._engine.loaded_models() if self.state == "ready" else []

    def _run(self) -> None:
        try:
            self._engine.load()
            self.state = "ready"
        except Exception as exc:  # a bad weights path must not kill the server: health shows it, jobs fail
            log.exception("loading models failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.state = "error"
        while not self._stopping.is_set():
            for job_id in self._store.abort_expired(time.time()):
                self._notify(job_id, "completed")
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

    def _run_job(self, job: Job) -> None:
        self._notify(job.id, "start")
        if self.state == "error":
            self._store.finish(job.id, Status.FAILED, error=f"The model failed to load: {self.load_error}")
            self._notify(job.id, "completed")
            return
        spec = job.spec

        def on_step(done: int, total: int, previews: list[Image.Image] | None) -> None:
            if self._stopping.is_set():
                raise _ShuttingDown
            if self._store.is_cancel_requested(job.id) or (job.deadline is not None and time.time() > job.deadline):
                raise Cancelled
            self._store.update_progress(job.id, done, total)
            for i, preview in enumerate(previews or []):
                key = f"{job.id}/preview-{done}-{i}.png"
                buf = io.BytesIO()
                preview.save(buf, format="PNG", compress_level=1)
                self._storage.put(key, buf.getvalue())
                self._store.add_preview(job.id, key)
            self._notify(job.id, "logs")

        try:
            if self._store.is_cancel_requested(job.id):
                raise Cancelled
            request = EngineRequest(
                spec,
                images=[self._load_input(key) for key in spec.images],
                mask=self._load_input(spec.mask) if spec.mask else None,
            )
            [images] = self._engine.generate([request], on_step)
            outputs = self._save_outputs(job, images)
            self._store.finish(job.id, Status.SUCCEEDED, outputs=outputs)
            self._notify(job.id, "output")
        except Cancelled:
            self._store.finish(job.id, Status.CANCELED, error="canceled")
        except _ShuttingDown:
            # A clean stop is not the job's fault: give the attempt back and run it after restart.
            self._store.requeue(job.id)
            log.info("job %s re-queued by shutdown", job.id)
            self._notify(job.id)
            return
        except FluxServeError as exc:
            self._store.finish(job.id, Status.FAILED, error=exc.message)
        except Exception as exc:  # the worker must outlive any one job
            log.exception("job %s failed", job.id)
            self._store.finish(job.id, Status.FAILED, error=f"Generation failed: {type(exc).__name__}: {exc}")
        self._notify(job.id, "completed")

    def _save_outputs(self, job: Job, images: list[Image.Image]) -> list[Output]:
        spec = job.spec
        model = self._registry.get(spec.model)
        outputs = []
        for i, (image, seed) in enumerate(zip(images, spec.image_seeds(), strict=True)):
            key = f"{job.id}/out-{i}.{EXTENSIONS[spec.output_format]}"
            meta: dict[str, object] = {"prompt": spec.prompt, "seed": seed, "model": model.label, "steps": spec.steps}
            if spec.guidance is not None:
                meta["guidance"] = spec.guidance
            self._storage.put(key, encode_image(image, spec.output_format, spec.quality, meta))
            outputs.append(Output(key, seed, image.width, image.height, spec.output_format))
        return outputs
