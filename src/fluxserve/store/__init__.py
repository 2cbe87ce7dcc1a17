"""The database, split along its tables: schema.py (tables), db.py (engine, pools, write lock, errors),
jobs.py (job rows and fenced transitions), events.py (job_events, NOTIFY), outbox.py (webhook deliveries),
keys.py (API keys, the shared secret), credits.py (the credit ledger), files.py (uploads), batches.py (OpenAI
batches), licences.py (BFL licence usage outbox), reports.py (usage, metrics, retention reads).

``Store`` is all of them over one engine. Only JobService calls the methods that change a job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .batches import Batch, BatchQueries
from .credits import CreditQueries
from .db import BUSY_S, POOL_OVERFLOW, POOL_SIZE, POOL_WAIT_S, Database, application_name
from .events import KEYS_CHANGED, NOTIFY_CHANNEL, EventQueries
from .files import FileQueries, StoredFile
from .hooks import LocalHooks, QueueHooks
from .jobs import DuplicateJob, JobQueries, insert_row, job_reads, serialize_owner
from .keys import KeyQueries, key_limits
from .licences import LicenceQueries, UsageBatch, record_usage
from .outbox import OutboxQueries, WebhookRules
from .reports import Reports, usage
from .rows import outputs_json, to_job
from .schema import (
    api_keys,
    batches,
    files,
    job_events,
    jobs,
    licence_usage,
    metadata,
    server_secrets,
    webhook_deliveries,
    workers,
)
from .transition import Fence


class Store(
    JobQueries,
    EventQueries,
    OutboxQueries,
    KeyQueries,
    CreditQueries,
    FileQueries,
    BatchQueries,
    LicenceQueries,
    Reports,
    Database,
):
    def __init__(
        self,
        url: str,
        *,
        queue: QueueHooks | None = None,
        webhook_rules: Mapping[str, WebhookRules] | None = None,
        **pool: Any,
    ) -> None:
        """``queue``: what the queue writes inside the store's transactions (queue.hooks: the embedded one by
        default; PostgreSQL's needs procrastinate). ``webhook_rules``: which webhook events each dialect sends
        (api/dialects.py); a dialect without rules sends none. Both are fixed for the store's life."""
        super().__init__(url, **pool)
        self.queue: QueueHooks = queue if queue is not None else LocalHooks()
        self.job_reads = job_reads(self.is_sqlite, self.queue.position_sql)
        self.webhook_rules: Mapping[str, WebhookRules] = dict(webhook_rules or {})


__all__ = [
    "BUSY_S",
    "KEYS_CHANGED",
    "NOTIFY_CHANNEL",
    "POOL_OVERFLOW",
    "POOL_SIZE",
    "POOL_WAIT_S",
    "Batch",
    "DuplicateJob",
    "Fence",
    "LocalHooks",
    "QueueHooks",
    "Store",
    "StoredFile",
    "UsageBatch",
    "WebhookRules",
    "api_keys",
    "application_name",
    "batches",
    "files",
    "insert_row",
    "job_events",
    "jobs",
    "key_limits",
    "licence_usage",
    "metadata",
    "outputs_json",
    "record_usage",
    "serialize_owner",
    "server_secrets",
    "to_job",
    "usage",
    "webhook_deliveries",
    "workers",
]
