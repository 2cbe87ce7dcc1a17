"""A job as the jobs table holds it: the row written for a new job, and the Job read back from any row."""

from __future__ import annotations

import functools
import json
from typing import Any

from sqlalchemy.engine import Row

from ..job import Job, Output, Status
from ..spec import GenerationSpec


def job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "owner": job.owner,
        "dialect": job.dialect,
        "model": job.spec.model,
        "status": job.status.value,
        "spec": json.dumps(job.spec.to_dict()),
        "request": json.dumps(job.request),
        "created_at": job.created_at,
        "attempts": job.attempts,  # 0, or 1 where the create claimed it (JobService._insert)
        "started_at": job.started_at,
        "worker_id": job.worker_id,
        "lease_expires_at": job.lease_expires_at,
        "progress_done": 0,
        "progress_total": job.spec.steps,
        "outputs": "[]",
        "cancel_requested": False,
        "deadline": job.deadline,
        "webhook": json.dumps(job.webhook) if job.webhook else None,
        "idempotency_key": job.idempotency_key,
        "fingerprint": job.fingerprint,
        "previews": "[]",
        "images": job.spec.num_images,
        "megapixels": job.spec.num_images * job.spec.width * job.spec.height / 1e6,
        "route": job.route,
        "cost": job.cost,
        "retain_s": job.retain_s,
        "batch_id": job.batch_id,
    }


def outputs_json(outputs: list[Output]) -> str:
    return json.dumps([o.__dict__ for o in outputs])


@functools.lru_cache(maxsize=1024)
def _spec(text: str) -> GenerationSpec:
    """A job's spec column is written once, at its create, and its GenerationSpec is frozen: parsed once per
    text here rather than on every read of the row (a relayed image's claim, completion and polls each read
    it; the parse was a fifth of a completion's CPU)."""
    return GenerationSpec.from_dict(json.loads(text))


def to_job(row: Row[Any]) -> Job:
    return Job(
        id=row.id,
        owner=row.owner,
        dialect=row.dialect,
        spec=_spec(row.spec),
        request=json.loads(row.request),
        status=Status(row.status),
        created_at=row.created_at,
        started_at=row.started_at,
        completed_at=row.completed_at,
        attempts=row.attempts,
        worker_id=row.worker_id,
        lease_expires_at=row.lease_expires_at,
        cancel_requested=bool(row.cancel_requested),
        progress_done=row.progress_done,
        progress_total=row.progress_total,
        outputs=tuple(Output(**o) for o in json.loads(row.outputs)),
        error=row.error,
        deadline=row.deadline,
        webhook=json.loads(row.webhook) if row.webhook else None,
        idempotency_key=row.idempotency_key,
        fingerprint=row.fingerprint,
        previews=tuple(json.loads(row.previews or "[]")),
        files_expired_at=row.files_expired_at,
        route=row.route,
        cost=row.cost,
        error_code=row.error_code,
        note=row.note,
        retain_s=row.retain_s,
        batch_id=row.batch_id,
        encode_s=row.encode_s,
    )
