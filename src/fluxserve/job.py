"""Job, Status, Output and job events: plain data, no store, no I/O."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from .spec import GenerationSpec

_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def new_job_id() -> str:
    """26 random base32 characters (130 bits), the shape of the seed's ids."""
    # One read of the system's randomness rather than one per character (secrets.choice).
    n = int.from_bytes(secrets.token_bytes(17))
    return "".join(_ID_ALPHABET[(n >> (5 * i)) & 31] for i in range(26))


# A worker's state as /health shows it (queue.base.Worker, worker.DeviceWorker, upstream.worker.UpstreamWorker).
WorkerState = Literal["loading", "ready", "error", "stopped"]


class Status(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    ABORTED = "aborted"  # its Cancel-After deadline passed before it started

    @property
    def is_terminal(self) -> bool:
        return self in (Status.SUCCEEDED, Status.FAILED, Status.CANCELED, Status.ABORTED)

    @property
    def public(self) -> str:
        """The lifecycle name the seed and Replicate use (queued jobs are 'starting')."""
        return "starting" if self is Status.QUEUED else self.value


class EventKind(StrEnum):
    """One row in job_events per transition; watchers and webhooks read these."""

    SUBMITTED = "submitted"
    STARTED = "started"
    PROGRESS = "progress"
    PREVIEW = "preview"
    CANCEL_REQUESTED = "cancel_requested"
    REQUEUED = "requeued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    ABORTED = "aborted"
    # An upstream provider's task for this attempt: "submitting" before the request, "task" with its id.
    UPSTREAM = "upstream"
    ROUTED = "routed"  # sent to another upstream (spill-over, failover) while queued

    @property
    def is_ending(self) -> bool:
        return self in (EventKind.SUCCEEDED, EventKind.FAILED, EventKind.CANCELED, EventKind.ABORTED)


@dataclass(frozen=True)
class JobEvent:
    id: int
    job_id: str
    attempt: int
    kind: EventKind
    payload: dict[str, Any]
    at: float


@dataclass(frozen=True)
class Output:
    key: str
    seed: int
    width: int
    height: int
    format: str
    prompt: str | None = None  # the prompt it was made from where the engine rewrote the request's (upsampling)


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    dialect: str
    spec: GenerationSpec
    request: dict[str, Any]
    status: Status = Status.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0  # the fencing token: the claim that may write this job's result
    worker_id: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    progress_done: int = 0
    progress_total: int = 0
    outputs: tuple[Output, ...] = ()
    error: str | None = None
    queue_position: int | None = None
    files_expired_at: float | None = None  # its images and inputs were deleted (retention)
    deadline: float | None = None
    webhook: dict[str, Any] | None = None  # {"url", "events", "secret"?}
    idempotency_key: str | None = None
    fingerprint: str | None = None
    previews: tuple[str, ...] = ()  # storage keys of in-progress previews, oldest first
    route: str | None = None  # the upstream provider running it; None: a local device
    cost: float | None = None  # credits held for it (None: its key is not metered)
    error_code: str | None = None
    note: str | None = None  # set by its worker before the first step: "loading flux-dev: ..."
    retain_s: float | None = None  # its files' own retention, shorter than the operator's (None: the operator's)
    batch_id: str | None = None  # a line of this OpenAI batch: queued behind every interactive job
    encode_s: float | None = None  # seconds its images took to encode and store (Server-Timing, metrics)

    @property
    def loading(self) -> bool:
        """Claimed, its model still loading: dialects with a place for it say so (Replicate's "starting")."""
        return self.status is Status.PROCESSING and self.note is not None and self.progress_done == 0

    @property
    def size(self) -> tuple[int, int]:
        """The size its images are: the first output's once there are outputs (a provider may answer another
        size than asked, and no answer claims one that isn't), else the size asked for."""
        if self.outputs:
            return self.outputs[0].width, self.outputs[0].height
        return self.spec.width, self.spec.height

    @property
    def public_status(self) -> str:
        """The seed's and Replicate's lifecycle name: queued and loading jobs are 'starting'."""
        return "starting" if self.loading else self.status.public

    @property
    def progress(self) -> float:
        if self.status is Status.SUCCEEDED:
            return 1.0
        return self.progress_done / self.progress_total if self.progress_total else 0.0

    def log_lines(self) -> list[str]:
        """Progress as log lines, for dialects (Replicate) that report it as logs."""
        lines = [f"Using seed: {self.spec.seed}"]
        lines += [f"Using LoRA {a.source} (sha256 {a.digest[:12]}) at scale {a.scale:g}" for a in self.spec.loras]
        if self.note is not None:
            lines.append(self.note)
        if self.started_at is not None:
            lines.append(f"Running {self.spec.model} at {self.spec.width}x{self.spec.height}, {self.spec.steps} steps")
        lines += [f"step {i}/{self.progress_total}" for i in range(1, self.progress_done + 1)]
        return lines
