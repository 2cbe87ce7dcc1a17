"""Where a failing upstream's job goes next: the model's fallback list, minus every upstream it was already on."""

from __future__ import annotations

from ..job import EventKind, Job, JobEvent
from ..models import ModelRegistry


def next_route(job: Job, registry: ModelRegistry, events: list[JobEvent]) -> str | None:
    """The model's next fallback upstream this job has not been on yet (None: none left); ``events``: the job's."""
    model = registry.get(job.spec.model)
    tried = {job.route} | {e.payload.get("from") for e in events if e.kind is EventKind.ROUTED}
    return next((u for u in model.fallback if u not in tried and u in registry.upstreams), None)
