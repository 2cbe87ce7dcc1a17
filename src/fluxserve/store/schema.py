"""The tables every node shares. Migrations (fluxserve.migrations) create and extend them."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("owner", String(64), nullable=False, index=True),
    Column("dialect", String(16), nullable=False),
    Column("model", String(64), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("spec", Text, nullable=False),
    Column("request", Text, nullable=False),
    Column("created_at", Float, nullable=False, index=True),
    Column("started_at", Float),
    Column("completed_at", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("progress_done", Integer, nullable=False, default=0),
    Column("progress_total", Integer, nullable=False, default=0),
    Column("outputs", Text, nullable=False, default="[]"),
    Column("error", Text),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("deadline", Float),
    Column("webhook", Text),
    Column("idempotency_key", String(255)),
    Column("fingerprint", String(64)),
    Column("previews", Text, nullable=False, default="[]"),
    Column("worker_id", String(128)),
    Column("lease_expires_at", Float),
    Column("images", Integer),  # images asked for (per-key daily limits, usage, metrics)
    Column("megapixels", Float),  # images x width x height / 1e6
    Column("files_expired_at", Float),  # outputs, inputs and previews deleted (retention)
    Column("encode_s", Float),  # seconds spent encoding and storing its images (metrics)
    Column("pc_job_id", BigInteger),  # its procrastinate queue row (PostgreSQL); NULL on SQLite
    # Its place between keys (store.fairness), fixed at submit; both queues fetch in its order.
    Column("priority", Integer),
    # The upstream provider that runs it ([upstreams.NAME]); NULL: a local device.
    Column("route", String(64)),
    Column("cost", Float),  # credits held for it at submit; given back when it does not succeed
    Column("error_code", String(32)),  # why it failed, as a code ("upstream_rejected": the provider refused it)
    Column("note", String(300)),  # what its worker is doing before the first step ("loading flux-dev: ...")
    Column("retain_s", Float),  # its files' own retention (fal's lifecycle preference), never past the operator's
    Column("batch_id", String(32), index=True),  # the OpenAI batch it is a line of (lowest priority)
    Column("mark", String(12), index=True),  # the watermark its images carry (provenance.mark_of, hex)
    UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
    # Per-key limits (fluxserve.limits): NULL takes the server's default, 0 means none.
    Column("max_queued", Integer),
    Column("rpm", Integer),
    Column("images_per_day", Integer),
    Column("credits", Float),  # the key's balance; NULL: not metered
    Column("admin", Boolean),  # may put the engine to sleep and wake it (NULL: no)
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("kind", String(24), nullable=False),
    Column("payload", Text, nullable=False, default="{}"),
    Column("at", Float, nullable=False),
    Index("ix_job_events_job_id_id", "job_id", "id"),
)

# The webhook outbox: one row per delivery, written with the transition that causes it.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("msg_id", String(40), nullable=False, unique=True),  # webhook-id, the same on every try
    Column("job_id", String(32), nullable=False, index=True),
    Column("event", String(16), nullable=False),
    Column("receiver", String(300), nullable=False),  # scheme://host:port: the unit of per-receiver limits
    Column("state", String(12), nullable=False),  # pending, delivered, failed
    Column("body", Text),  # rendered at the first try, then sent unchanged
    Column("attempts", Integer, nullable=False, default=0),
    Column("due_at", Float, nullable=False),
    Column("claimed_until", Float),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Index("ix_webhook_deliveries_state_due", "state", "due_at"),
)

# BFL self-hosted licence usage: one row per succeeded local job of a licensed model, written with its success;
# sent to BFL in batches (one per slug), each batch under one id that is also its Idempotency-Key.
licence_usage = Table(
    "licence_usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), nullable=False, unique=True),  # a job counts once, whatever retries its success
    Column("slug", String(64), nullable=False),  # BFL's model slug (flux-1-dev, flux-1-kontext-dev, flux-tools)
    Column("generations", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("batch", String(32)),  # the report it went into (NULL: not yet in one)
    Column("claimed_at", Float),  # when a sender took the batch; another takes it over after a lease
    Column("sent_at", Float),  # BFL acknowledged the batch
    Column("last_error", Text),
    Index("ix_licence_usage_batch_sent", "batch", "sent_at"),
)

# Replicate's files API: uploads a key owns, named by URL in its predictions' inputs.
files = Table(
    "files",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("name", String(255), nullable=False),
    Column("content_type", String(128), nullable=False),
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("md5", String(32), nullable=False),
    Column("metadata", Text, nullable=False, default="{}"),
    Column("key", String(300), nullable=False),  # its storage key
    Column("created_at", Float, nullable=False),
    Index("ix_files_owner_created_at", "owner", "created_at"),
)

# OpenAI's Batch API over images: each line a job (jobs.batch_id); the lines refused at create kept here for the
# error file; the output and error files written once every job has ended.
batches = Table(
    "batches",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(32), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("total", Integer, nullable=False, default=0),
    Column("rejected", Text, nullable=False, default="[]"),  # [{line, custom_id, code, message}]
    Column("metadata", Text, nullable=False, default="{}"),
    Column("output_file_id", String(32)),
    Column("error_file_id", String(32)),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("in_progress_at", Float),
    Column("finalizing_at", Float),
    Column("completed_at", Float),
    Column("expired_at", Float),
    Column("cancelling_at", Float),
    Column("cancelled_at", Float),
    Index("ix_batches_owner_created_at", "owner", "created_at"),
)

# One secret for every node: signs file URLs and derives webhook secrets.
server_secrets = Table(
    "server_secrets",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
)

# GPU workers as seen through the database (/health on any node lists them).
workers = Table(
    "fluxserve_workers",
    metadata,
    Column("id", String(160), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("device", String(64), nullable=False),
    Column("models", Text, nullable=False),  # JSON list
    Column("state", String(16), nullable=False),
    Column("error", Text),
    Column("current_job", String(32)),
    Column("warm", Text),  # JSON list: the names resident on its device now (jobs for them go to it first)
    Column("started_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)
