"""Usage per key, model and UTC day: jobs accepted, images and megapixels delivered, worker seconds.

Computed from the jobs table (shared by every node), for the operator (`fluxserve usage`) and for
a key's own figures (`GET /v1/usage`). Worker seconds are each job's claim-to-end wall time; jobs
that ran batched together each count the batch's whole time.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any

from .errors import InvalidInput
from .job import Status
from .store import Store


@dataclass
class UsageRow:
    day: str
    key: str
    model: str
    jobs: int = 0
    images: int = 0
    megapixels: float = 0.0
    worker_seconds: float = 0.0
    cost: float = 0.0  # credits charged: priced jobs that succeeded (the rest were refunded)
    # By end user only: the request's safety_identifier (OpenAI's successor of `user`), else its user.
    end_user: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.end_user is None:
            del out["end_user"]
        out["cost"] = round(self.cost, 6)
        out["megapixels"] = round(self.megapixels, 3)
        out["worker_seconds"] = round(self.worker_seconds, 3)
        return out


def parse_since(value: str | None, *, param: str = "since") -> float:
    """YYYY-MM-DD (UTC midnight); default: the start of today (UTC)."""
    if not value:
        return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    try:
        day = date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(f"{param} must be a date as YYYY-MM-DD; got {value!r}.", param=param) from exc
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def usage(store: Store, since: float, owner: str | None = None, *, by_end_user: bool = False) -> list[UsageRow]:
    names = {row.id: row.name for row in store.list_keys()}
    rows: dict[tuple[str, str, str, str | None], UsageRow] = {}
    acc: defaultdict[tuple[str, str, str, str | None], list[Any]] = defaultdict(list)
    for r in store.job_usage(since, owner, requests=by_end_user):
        day = datetime.fromtimestamp(r.created_at, UTC).date().isoformat()
        key = names.get(r.owner, "FLUXSERVE_API_KEY" if r.owner.startswith("env_") else r.owner)
        acc[(day, key, r.model, _end_user(r.request) if by_end_user else None)].append(r)
    for (day, key, model, end_user), jobs in acc.items():
        row = rows[(day, key, model, end_user)] = UsageRow(day, key, model, end_user=end_user)
        for r in jobs:
            row.jobs += 1
            if r.status == Status.SUCCEEDED.value:
                row.images += r.images or 1
                row.megapixels += r.megapixels or 0.0
                row.cost += r.cost or 0.0
            if r.started_at is not None and r.completed_at is not None:
                row.worker_seconds += max(0.0, r.completed_at - r.started_at)
    return sorted(rows.values(), key=lambda u: (u.day, u.key, u.model, u.end_user or ""))


def _end_user(request: str) -> str:
    """The end user a request named (safety_identifier, else user; "" for none)."""
    try:
        fields = json.loads(request)
    except ValueError:
        return ""
    value = fields.get("safety_identifier") or fields.get("user") if isinstance(fields, dict) else None
    return value if isinstance(value, str) else ""
