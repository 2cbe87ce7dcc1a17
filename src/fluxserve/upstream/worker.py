"""UpstreamWorker: runs queued jobs as tasks of a hosted provider, many at once, exactly once per attempt.

The queue hands it a job id (queue/local.py's slots, or procrastinate's task on PostgreSQL) as it does a
DeviceWorker. It claims the job under a lease, then for each image task: writes an ``upstream`` job
event ("submitting"), submits, writes the task id (event "task"), and only then polls. A worker killed
anywhere in that sequence leaves the events behind: the next attempt resumes polling the recorded task,
and a "submitting" without a task (the answer was lost) is sent again only to an idempotent upstream.
Results are fetched through the guarded fetch (the upstream's own host is the one private address
allowed), re-encoded as the job asked and written to our storage before the job completes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx

from ..engine.safety import FLAGGED_CODE, SafetyChecker, Withheld
from ..errors import FluxServeError, InvalidInput, PaymentRequired, StoreUnavailable
from ..images import decode_image, fetch_url
from ..job import EventKind, Job, Output, Status
from ..jobs import JobService
from ..models import ModelRegistry
from ..models.upstreams import UpstreamConfig
from ..outputs import EXTENSIONS, as_asked
from ..provenance import Provenance, SigningFailed
from ..spec import GenerationSpec
from ..storage import Storage
from ..workers import PROVENANCE_CODE, PROVENANCE_FAILED, LeasedWorker
from .base import MALFORMED, AccountError, Done, Inputs, Malformed, Provider, Rejected, Task, Unavailable
from .health import Health
from .hooks import hook_secret, hook_url, task_ref
from .pacing import Pacing
from .providers import provider_for
from .routing import next_route

log = logging.getLogger(__name__)

# How long a job as its claim read it stands for a read of its row before the first submit (a cancel asked in
# between still ends the job canceled, at its completion: JobService.complete).
FRESH_S = 0.25
LOST_ANSWER = (
    "The upstream {name} may have started a task for this job, but its answer was lost; it is not sent "
    "again (that could be charged twice)."
)


class _Stop(Exception):
    """The claim ended under us: canceled, lease lost, or this worker is stopping."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class UpstreamWorker(LeasedWorker):
    """One upstream provider as a queue worker: ``concurrency`` = its max_in_flight."""

    takes_claimed = True  # its jobs need nothing loaded: one can start in its create's transaction (run_held)

    def __init__(
        self,
        jobs: JobService,
        storage: Storage,
        registry: ModelRegistry,
        config: UpstreamConfig,
        *,
        allow_private: bool = False,
        storage_retry_s: float = 60.0,
        transport: Any = None,  # tests: an httpx transport for the provider's calls and the result fetches
        hooks: tuple[str, bytes] | None = None,  # (public URL, server secret): providers that take webhooks get one
        provenance: Provenance | None = None,
        safety: SafetyChecker | None = None,
    ) -> None:
        super().__init__(jobs, storage, f"upstream:{config.name}", storage_retry_s=storage_retry_s)
        self._transport = transport
        self._registry = registry
        self.config = config
        self.route = config.name
        self.device = f"upstream:{config.name}"
        self.concurrency = config.max_in_flight
        self.provider: Provider = provider_for(config)
        self.health = Health(config.unhealthy_after, config.cooldown_s)
        self.pacing = Pacing(config.poll_interval_s)
        self._allow_private = allow_private
        self._hooks = hooks if self.provider.takes_webhooks else None
        self._provenance = provenance or Provenance.off()
        self._safety = safety
        self._client = httpx.Client(
            timeout=httpx.Timeout(60.0, connect=10.0),
            limits=httpx.Limits(max_connections=config.max_in_flight, max_keepalive_connections=config.max_in_flight),
            transport=transport,
            follow_redirects=False,
        )

    # -- the Worker seam (queue.base.Worker) -------------------------------------------

    def models(self) -> list[str]:
        return self._registry.routed_to(self.config.name)

    def loaded_models(self) -> list[str]:
        return self.models() if self.state == "ready" else []

    def engine_info(self) -> dict[str, Any]:
        return {"upstream": self.config.public() | self.health.view() | {"in_flight": len(self._held)}}

    def load(self) -> bool:
        if self.config.api_key_env and not self.config.api_key():
            self.load_error = f"upstream {self.config.name}: the variable {self.config.api_key_env} is not set"
            self.state = "error"
            log.error("%s", self.load_error)
        else:
            self.state = "ready"
        return self.state == "ready"

    def lower_priority(self) -> None:
        pass  # waits on the network, never on the CPU

    def stop(self, timeout: float = 10.0) -> None:
        self.begin_stop()
        with self._held_lock:
            held = list(self._held)
        for job_id in held:  # a task waiting between polls looks now, and stops
            self._jobs.wake(job_id)
        super().stop(timeout)
        self._client.close()

    def run_claimed(self, job_id: str, lock: Any = None, abort: Callable[[], str | None] | None = None) -> list[Job]:
        job = self._store(self._jobs.claim_id, job_id, self.worker_id)
        return [] if job is None else self._hold(job, abort or (lambda: None), time.monotonic(), first=False)

    def run_held(self, job: Job) -> list[Job]:
        """Run a job its create claimed for this worker (JobService.take_at_create), as that create wrote it at
        ``started_at`` (this machine's clock: the embedded queue's). Its first claim: no attempt before it can
        have started a task upstream, so no events are read for one."""
        age = max(0.0, time.time() - (job.started_at or 0.0))
        return self._hold(job, lambda: None, time.monotonic() - age, first=True)

    def _hold(self, job: Job, abort: Callable[[], str | None], read_at: float, *, first: bool) -> list[Job]:
        with self._held_lock:
            self._held[job.id] = job
        try:
            self._run(job, abort, read_at, first)
        except StoreUnavailable:  # only when stopping: the lease runs out and the job is resumed elsewhere
            log.warning("upstream worker %s stopped before recording job %s", self.worker_id, job.id)
        finally:
            with self._held_lock:
                if self._held.get(job.id) is job:
                    del self._held[job.id]
                self._lost.discard(job.id)
        return [job]

    # -- one job -------------------------------------------------------------------

    def _run(self, job: Job, abort: Callable[[], str | None], read_at: float, first: bool) -> None:
        name = self.config.name
        if self.state == "error":  # its key is missing: its jobs go to a fallback, or fail saying why
            if not self._fail_over(job, self.load_error or "not configured"):
                self._fail(job, f"The upstream {name} is not usable: {self.load_error}")
            return
        try:
            if not self.health.usable() and self._fail_over(job, f"upstream {name} is cooling down"):
                return
            outputs = self._save(job, self._tasks(job, abort, read_at, first))
        except _Stop as stop:
            self._stopped(job, stop.why)
            return
        except AccountError as exc:  # the operator's account or configuration: another upstream may serve it
            self.health.trip(exc.message)
            if not self._fail_over(job, exc.message):
                self._fail(
                    job, f"The upstream {name} could not serve it (its account or setup): {exc.message}", code=exc.code
                )
            return
        except Malformed as exc:
            self.health.failed(exc.message)
            self._fail(job, f"The upstream {name} gave an answer that could not be read: {exc.message}", code=exc.code)
            return
        except Rejected as exc:
            self._fail(job, f"The upstream {name} refused the request: {exc.message}", code="upstream_rejected")
            return
        except Unavailable as exc:
            self.health.failed(exc.message)
            if not self._fail_over(job, exc.message):
                self._fail(job, f"The upstream {name} failed: {exc.message}")
            return
        except SigningFailed as exc:  # never an unmarked image
            self._fail(job, f"{PROVENANCE_FAILED}: {exc}", code=PROVENANCE_CODE)
            return
        except Withheld as exc:  # flagged by this server's safety check (where one is configured)
            self._fail(job, str(exc), code=FLAGGED_CODE)
            return
        except FluxServeError as exc:
            self._fail(job, exc.message)
            return
        except OSError as exc:
            log.error("job %s: the image storage failed: %s", job.id, exc)
            self._fail(job, f"The server's image storage failed ({exc.strerror or exc}).")
            return
        self.health.succeeded()
        mark = self._provenance.mark(job.id)
        self._end(job, lambda j: self._jobs.complete(j, outputs, mark=mark))

    def _fail(self, job: Job, message: str, code: str | None = None) -> None:
        self._end(job, lambda j: self._jobs.fail(j, message, code=code))

    def _parts(self, spec: GenerationSpec, model: str) -> list[GenerationSpec]:
        """One spec per upstream task: providers that make one image per task get one task per image."""
        if spec.num_images == 1 or self.provider.images_per_task(spec, model) >= spec.num_images:
            return [spec]
        return [replace(spec, seed=seed, num_images=1) for seed in spec.image_seeds()]

    def _tasks(self, job: Job, abort: Callable[[], str | None], claimed: float, first: bool) -> list[Done]:
        """``claimed``: when ``job`` was read (time.monotonic), by its claim; ``first``: the job's first claim."""
        model = self._registry.upstream_model(job.spec.model, self.config.name)
        known, submitting = ({}, set()) if first else self._recorded(job)
        mask = self._storage_io(self._storage.read, job.spec.mask) if job.spec.mask else None
        inputs = Inputs([self._storage_io(self._storage.read, k) for k in job.spec.images], mask)
        deadline = time.monotonic() + self.config.timeout_s
        results: list[Done] = []
        for index, part in enumerate(self._parts(job.spec, model)):
            task = known.get(index)
            if task is None:
                if index in submitting and not self.config.idempotent:
                    raise Rejected(LOST_ANSWER.format(name=self.config.name))
                answer = self._submit(job, index, part, model, inputs, deadline, abort, claimed)
                if isinstance(answer, Done):
                    results.append(answer)
                    continue
                task = answer
            results.append(self._poll(job, task, deadline, abort))
        return results

    def _recorded(self, job: Job) -> tuple[dict[int, Task], set[int]]:
        """This job's tasks on this upstream from earlier attempts' events (and this one's)."""
        tasks: dict[int, Task] = {}
        submitting: set[int] = set()
        for event in self._store(self._jobs.store.events, job.id):
            p = event.payload
            if event.kind is not EventKind.UPSTREAM or p.get("upstream") != self.config.name:
                continue
            if p.get("phase") == "task":
                tasks[int(p["index"])] = Task.from_dict(p)
            elif p.get("phase") == "submitting":
                submitting.add(int(p["index"]))
            elif p.get("phase") == "unsent":  # that submit failed before any task could exist
                submitting.discard(int(p["index"]))
        return tasks, submitting

    def _record(self, job: Job, payload: dict[str, Any]) -> None:
        """A fenced event: written only while this attempt still holds the job."""
        if not self._store(self._jobs.note_upstream, job, {"upstream": self.config.name, **payload}):
            raise _Stop("lost")

    def _sending(self, job: Job, phase: str, index: int) -> None:
        """Before a submit to an upstream that would make a second task of a resend ("submitting"), and after
        one that never reached it ("unsent"): a new attempt then knows whether an answer was lost. An
        idempotent upstream gets the resend with the same Idempotency-Key instead, so nothing is written (a
        write transaction per relayed image)."""
        if not self.config.idempotent:
            self._record(job, {"phase": phase, "index": index})

    def _submit(
        self,
        job: Job,
        index: int,
        spec: GenerationSpec,
        model: str,
        inputs: Inputs,
        deadline: float,
        abort: Callable[[], str | None],
        read_at: float,
    ) -> Task | Done:
        self._check(job, abort, read_at)
        self._sending(job, "submitting", index)
        key = self.config.api_key()
        backoff = self.config.retry_base_s
        for attempt in range(self.config.retries + 1):
            try:
                answer: Task | Done = self.provider.submit(
                    self._client,
                    spec,
                    model,
                    inputs,
                    key,
                    idempotency_key=f"{job.id}-{index}",
                    wait_s=wait_s(job, deadline),
                    webhook=self._webhook(job, index),
                )
                break
            except MALFORMED as exc:  # it answered, so it may have started a task: never sent again
                raise Malformed(f"{type(exc).__name__}: {exc}") from exc
            except Rejected as exc:
                if exc.status == 404:  # on a submit: the provider has no such model (the route's upstream_model)
                    raise AccountError(f"the provider does not know the model {model!r}: {exc.message}") from exc
                raise
            except Unavailable as exc:
                # Sent but unanswered (a read timeout, a dropped connection): a second send may be a second task.
                if exc.maybe_sent and not self.config.idempotent:
                    raise Rejected(LOST_ANSWER.format(name=self.config.name)) from exc
                if not exc.maybe_sent:  # never reached it, or answered an error: a stop now is no lost answer
                    self._sending(job, "unsent", index)
                if attempt == self.config.retries or time.monotonic() + backoff > deadline:
                    raise
                log.warning("job %s: upstream %s: %s; retry in %.1f s", job.id, self.config.name, exc.message, backoff)
                self._sleep(job, backoff, abort)
                self._check(job, abort)  # a cancel asked or the deadline passed during the backoff: no resend
                self._sending(job, "submitting", index)
                backoff *= 2
        if isinstance(answer, Task):
            self._record(job, {"phase": "task", "index": index, **answer.to_dict()})
        return answer

    def _webhook(self, job: Job, index: int) -> tuple[str, str] | None:
        if self._hooks is None:
            return None
        public_url, secret = self._hooks
        ref = task_ref(job.id, index)
        return hook_url(public_url, self.config.name, ref), hook_secret(secret, self.config.name, ref)

    def _poll(self, job: Job, task: Task, deadline: float, abort: Callable[[], str | None]) -> Done:
        with self._jobs.nudges(job.id) as nudge:  # the provider's webhook, where it sends one, wakes it early
            return self._poll_until(job, task, deadline, abort, nudge)

    def _poll_until(
        self, job: Job, task: Task, deadline: float, abort: Callable[[], str | None], nudge: threading.Event
    ) -> Done:
        key = self.config.api_key()
        errors = polls = 0
        start = time.monotonic()
        while True:
            try:
                self._check(job, abort)
            except _Stop as stop:
                if stop.why == "user":
                    self._cancel_upstream(task, key)
                raise
            if time.monotonic() > deadline:
                self._cancel_upstream(task, key)
                raise Unavailable(f"no result within timeout_s={self.config.timeout_s:g} s")
            try:
                done = self.provider.poll(self._client, task, key)
                errors = 0
            except MALFORMED as exc:
                self._cancel_upstream(task, key)
                raise Malformed(f"{type(exc).__name__}: {exc}") from exc
            except Unavailable as exc:  # a poll is a read: retried until the deadline, never resubmitted
                errors += 1
                log.warning("job %s: polling upstream %s: %s", job.id, self.config.name, exc.message)
                done = None
                if errors > self.config.retries * 4:
                    # It fails over next: the task may still run there and be billed a second time.
                    self._cancel_upstream(task, key)
                    raise
            polls += 1
            if done is not None:
                self.pacing.took(job.spec.model, time.monotonic() - start)
                return done
            nudge.wait(self.pacing.wait_s(job.spec.model, polls, time.monotonic() - start, errors))
            nudge.clear()
            if self._stopping.is_set():
                raise _Stop("shutdown")

    def _cancel_upstream(self, task: Task, key: str | None) -> None:
        try:
            self.provider.cancel(self._client, task, key)
        except FluxServeError as exc:
            log.info("upstream %s: cancel of task %s: %s", self.config.name, task.id, exc.message)

    def _check(self, job: Job, abort: Callable[[], str | None], read_at: float | None = None) -> None:
        """Stop for a cancel, a deadline, a lost claim or a shutdown. A read, not a write: hundreds of tasks
        in flight poll for minutes, and a progress row per poll would grow the events table for nothing.
        ``read_at``: when ``job`` was read (its claim); within FRESH_S it stands for the read (a relayed
        image's first submit follows its claim by well under a millisecond)."""
        if self._stopping.is_set() or abort() == "shutdown":
            raise _Stop("shutdown")
        if abort() == "user":
            raise _Stop("user")
        with self._held_lock:
            if job.id in self._lost:
                raise _Stop("lost")
        try:
            fresh = read_at is not None and time.monotonic() - read_at < FRESH_S
            current = job if fresh else self._jobs.store.get_job(job.id)
        except StoreUnavailable as exc:
            self.degrade(exc.message)
            return
        mine = current is not None and current.status is Status.PROCESSING and current.worker_id == job.worker_id
        if current is None or not mine or current.attempts != job.attempts:
            raise _Stop("lost")
        if current.cancel_requested or (current.deadline is not None and time.time() > current.deadline):
            raise _Stop("user")

    def _sleep(self, job: Job, seconds: float, abort: Callable[[], str | None]) -> None:
        if self._stopping.wait(seconds):
            raise _Stop("shutdown")

    def _stopped(self, job: Job, why: str) -> None:
        if why == "lost":
            log.warning("upstream worker %s lost its claim on job %s", self.worker_id, job.id)
        elif why == "shutdown":  # the task keeps running upstream; the next attempt resumes polling it
            self._end(job, lambda j: self._jobs.requeue(j, "shutdown", give_back_attempt=True))
        else:
            self._end(job, self._jobs.finish_canceled)

    def _fail_over(self, job: Job, reason: str) -> bool:
        """Send the job to the model's next fallback upstream (fenced), or back to the local queue where it was
        spilled from (a local worker will run it); False when there is nowhere left."""
        events = self._jobs.events(job.id)
        nxt = next_route(job, self._registry, events)
        if nxt is None:
            spilled = any(e.kind is EventKind.ROUTED and e.payload.get("reason") == "spill" for e in events)
            if not (spilled and self._registry.get(job.spec.model).is_local):
                return False
            log.warning("job %s: %s; back to the local queue it was spilled from", job.id, reason)
            return self._reroute(job, None, f"spilled upstream {self.config.name}: {reason}")
        log.warning("job %s: %s; failing over to upstream %s", job.id, reason, nxt)
        return self._reroute(job, nxt, reason)

    def _reroute(self, job: Job, route: str | None, reason: str) -> bool:
        """The fenced move; False when the key cannot pay the price where it would go (the job then fails)."""
        try:
            self._end(job, lambda j: self._jobs.reroute(j, route, reason))
        except PaymentRequired as exc:
            log.warning("job %s: not moved to %s: %s", job.id, route or "this server", exc.message)
            return False
        return True

    # -- results -------------------------------------------------------------------

    def _fetch(self, url: str) -> bytes:
        """The guarded fetch (size, time, public addresses), the upstream's own host allowed: each redirect hop
        is asked again, so a redirect from it to another private address is refused."""
        body = bytearray()
        try:
            asyncio.run(
                fetch_url(
                    url,
                    body.extend,
                    param="upstream result",
                    allow_private=self._allow_private or self._own_host,
                    max_bytes=self.config.max_image_mb * 1024 * 1024,
                    timeout_s=min(120.0, self.config.timeout_s),
                    transport=self._transport,
                )
            )
        except InvalidInput as exc:
            raise Unavailable(f"fetching its result failed: {exc.message}") from exc
        return bytes(body)

    def _own_host(self, url: str) -> bool:
        parts = httpx.URL(url)
        return (parts.host, parts.port or (443 if parts.scheme == "https" else 80)) == self.config.host

    def _save(self, job: Job, results: list[Done]) -> list[Output]:
        got: list[tuple[bytes, int | None]] = []
        for done in results:
            said = [*done.seeds, *[None] * (len(done.blobs) + len(done.urls))]
            got += [(b, said[i]) for i, b in enumerate(done.blobs)]
            got += [(self._fetch(u), said[len(done.blobs) + i]) for i, u in enumerate(done.urls)]
        spec = job.spec
        if self._safety is not None:
            self._safety.check(
                [decode_image(b, param="upstream result") for b, _ in got[: spec.num_images]], spec.safety_tolerance
            )
        outputs = []
        for i, ((blob, used), asked) in enumerate(zip(got[: spec.num_images], spec.image_seeds(), strict=False)):
            seed = asked if used is None else used  # the seed the provider used, where it says
            meta: dict[str, object] = {"prompt": spec.prompt, "seed": seed, "model": spec.model}
            meta["upstream"] = self.config.name
            key = f"{job.id}/out-{i}.{EXTENSIONS[spec.output_format]}"
            if self._provenance.enabled:  # marked like ours; the provider's file (and manifest) its parent
                data, (width, height) = self._provenance.stored(
                    blob,
                    job.id,
                    fmt=spec.output_format,
                    quality=spec.quality,
                    meta=meta,
                    model=spec.model,
                    prompt=spec.prompt,
                    title=f"{self.config.name}-{i}",
                )
            else:
                data, (width, height) = as_asked(blob, spec.output_format, spec.quality, meta)
            self._storage_io(self._storage.put, key, data)
            outputs.append(Output(key, seed, width, height, spec.output_format))
        if len(outputs) < spec.num_images:
            raise Unavailable(f"the upstream returned {len(outputs)} of {spec.num_images} images")
        return outputs

    # -- store writes and leases -------------------------------------------------------

    def _end(self, job: Job, outcome: Callable[[Job], bool]) -> None:
        if not self._store(outcome, job):
            log.warning("job %s: result not recorded, the claim was taken from worker %s", job.id, self.worker_id)


def wait_s(job: Job, deadline: float) -> float:
    """Seconds the job may still wait for its upstream: its timeout_s left, and its Cancel-After."""
    left = deadline - time.monotonic()
    if job.deadline is not None:
        left = min(left, job.deadline - time.time())
    return max(1.0, left)
