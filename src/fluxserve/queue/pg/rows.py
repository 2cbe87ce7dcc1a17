"""The PostgreSQL queue: procrastinate rows beside our jobs table, written in the same transactions.

Our ``jobs`` row stays the truth for clients and is fenced by attempt; procrastinate's row is the
dispatch and liveness layer: a queue per model (workers fetch only the models they serve), ``SKIP
LOCKED`` fetches, heartbeats, abort. Fairness between keys (store.fairness) is the job row's priority,
handed to procrastinate, whose fetch is priority-first.

Only the ``connection=`` forms of procrastinate's sync API are used here, on an App that is never
opened (an async-opened connector refuses sync calls; workers open their own in runner.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.engine import Connection

from ...job import Job, Status
from ...store import Store, application_name, jobs, workers

if TYPE_CHECKING:
    from ...jobs import JobService
    from ..base import Timing

log = logging.getLogger(__name__)

TASK = "fluxserve.generate"
SWEEP_LOCK = 0x666C7879  # one stall sweep at a time across nodes
# Our terminal statuses as procrastinate's end states.
END_STATES = {
    Status.SUCCEEDED: "succeeded",
    Status.FAILED: "failed",
    Status.CANCELED: "aborted",
    Status.ABORTED: "aborted",
}


def libpq_url(url: str, role: str | None = None) -> str:
    """SQLAlchemy's postgresql+psycopg:// URL as libpq takes it; with a role, its connections are named
    (store.application_name) so pg_stat_activity shows which process holds what."""
    scheme, rest = url.split("://", 1)
    plain = f"postgresql://{rest}" if scheme.startswith("postgres") else url
    if role is None:
        return plain
    return f"{plain}{'&' if '?' in plain else '?'}application_name={application_name(role)}"


def queue_name(model: str, route: str | None = None) -> str:
    """A local model's queue, or an upstream's (every name it runs shares it)."""
    return f"upstream:{route}" if route else f"model:{model}"


def warm_queue(worker_id: str) -> str:
    """A device worker's own queue: jobs handed to it because it has their model loaded (runner.HandOff)."""
    return f"warm:{worker_id}"


def _app(url: str) -> Any:
    """Never opened: every call passes the store's connection, so it holds none of its own."""
    import procrastinate

    return procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=libpq_url(url)))


_QUEUE_ROW = update(jobs).where(jobs.c.id == bindparam("job")).values(pc_job_id=bindparam("pc"))  # per create


class PgHooks:
    """The store's queue hooks (store.hooks.QueueHooks) on PostgreSQL: procrastinate rows written inside the
    store's own transactions. Needs only the database's address, so the store is built with it."""

    # procrastinate's fetch order (priority, then id) within the job's queue; its queue row still to do.
    position_sql = (
        "CASE WHEN m.status = 'queued' THEN 1 + (SELECT count(o.id) FROM procrastinate_jobs p "
        "JOIN procrastinate_jobs o ON o.queue_name = p.queue_name AND o.status = 'todo' "
        "AND (o.priority > p.priority OR (o.priority = p.priority AND o.id < p.id)) "
        "WHERE p.id = m.pc_job_id AND p.status = 'todo') END"
    )

    def __init__(self, url: str) -> None:
        self.app = _app(url)

    def deferred(self, conn: Connection, job: Job, priority: int) -> dict[str, Any]:
        """A new job's queue row, before its job row: the job row is written with the queue row's id (one
        statement fewer than writing it after). Neither is visible to a worker before the commit."""
        return {"pc_job_id": self._defer(conn, job.id, job.spec.model, priority, job.route)}

    def defer(self, conn: Connection, job_id: str, model: str, priority: int, route: str | None = None) -> None:
        """A new queue row for a job that has its row already (a requeue)."""
        conn.execute(_QUEUE_ROW, {"job": job_id, "pc": self._defer(conn, job_id, model, priority, route)})

    def _defer(self, conn: Connection, job_id: str, model: str, priority: int, route: str | None) -> int:
        deferrer = self.app.configure_task(
            TASK, connection=conn.connection.driver_connection, queue=queue_name(model, route), priority=priority
        )
        return int(deferrer.defer(job_id=job_id))

    def cancel(self, conn: Connection, job_id: str) -> None:
        """A queued entry is cancelled (never fetched); a running one gets abort_requested (NOTIFY to its worker)."""
        pc_id = conn.execute(select(jobs.c.pc_job_id).where(jobs.c.id == job_id)).scalar()
        if pc_id is not None:
            self.app.job_manager.cancel_job_by_id(pc_id, abort=True, connection=conn.connection.driver_connection)

    def rerouted(self, conn: Connection, job: Job) -> None:
        """Its queue row moves to the upstream's queue: to do now (spill-over), or once its task gives it
        back (failover: the worker's task raises Requeue, and procrastinate's retry keeps the queue name)."""
        name = queue_name(job.spec.model, job.route)
        row = conn.execute(
            text(
                "UPDATE procrastinate_jobs SET queue_name = :q WHERE id = (SELECT pc_job_id FROM jobs WHERE id = :id) "
                "AND status IN ('todo', 'doing') RETURNING id, status"
            ),
            {"q": name, "id": job.id},
        ).first()
        if row is not None and row.status == "todo":
            payload = json.dumps({"type": "job_inserted", "job_id": row.id})
            conn.execute(select(func.pg_notify(f"procrastinate_queue_v1#{name}", payload)))
            conn.execute(select(func.pg_notify("procrastinate_any_queue_v1", payload)))

    def position(self, conn: Connection, job_id: str) -> int | None:
        """1 = fetched next in its model's queue, in procrastinate's order (priority, then id); None unless queued."""
        value = conn.execute(text(f"SELECT {self.position_sql} FROM jobs m WHERE m.id = :id"), {"id": job_id}).scalar()
        return None if value is None else int(value)


class PgRows:
    """What workers and sweepers do to queue rows, over a store built with PgHooks."""

    name = "postgres"

    def __init__(self, store: Store, jobs: JobService | None = None, timing: Timing | None = None) -> None:
        if not isinstance(store.queue, PgHooks):
            raise TypeError("a PostgreSQL queue needs a store opened with queue=PgHooks(url)")
        self.store = store
        self.hooks: PgHooks = store.queue
        self.jobs = jobs
        self.timing = timing

    # -- batches: members claimed by the lead's worker ----------------------------

    def member_lock(self, pc_worker_id: int | None) -> Callable[[Connection, list[str]], list[str]]:
        """For Store.claim: lock the candidates' queue rows that are still to do (SKIP LOCKED: two workers
        never take the same job) and mark them doing under the lead's worker, as procrastinate's fetch does."""

        def lock(conn: Connection, ids: list[str]) -> list[str]:
            rows = conn.execute(
                text(
                    "SELECT j.id, p.id AS pc FROM procrastinate_jobs p JOIN jobs j ON j.pc_job_id = p.id "
                    "WHERE j.id = ANY(:ids) AND j.status = 'queued' AND p.status = 'todo' AND p.lock IS NULL "
                    "AND (p.scheduled_at IS NULL OR p.scheduled_at <= now()) FOR UPDATE OF p SKIP LOCKED"
                ),
                {"ids": ids},
            ).all()
            got = {r.id: r.pc for r in rows}
            if got:
                conn.execute(
                    text("UPDATE procrastinate_jobs SET status = 'doing', worker_id = :w WHERE id = ANY(:pcs)"),
                    {"w": pc_worker_id, "pcs": list(got.values())},
                )
            return [i for i in ids if i in got]

        return lock

    def settle(self, job_ids: list[str]) -> None:
        """Close the queue rows of batch members the lead's task ran: ended jobs end there too, a job given
        back (shutdown, lost lease) goes back to do."""
        if not job_ids:
            return
        with self.store.transaction() as conn:
            rows = conn.execute(
                text(
                    "SELECT j.id, j.status, p.id AS pc, p.queue_name FROM jobs j "
                    "JOIN procrastinate_jobs p ON p.id = j.pc_job_id WHERE j.id = ANY(:ids) AND p.status = 'doing' "
                    "FOR UPDATE OF p"
                ),
                {"ids": job_ids},
            ).all()
            for row in rows:
                self._settle_row(conn, row.pc, Status(row.status), row.queue_name)

    @staticmethod
    def _settle_row(conn: Connection, pc_id: int, status: Status | None, queue: str) -> None:
        if status is Status.QUEUED:
            conn.execute(text("SELECT procrastinate_retry_job_v2(:id, now(), NULL, NULL, NULL)"), {"id": pc_id})
            # procrastinate notifies on insert only: wake its workers on this queue as its trigger would.
            payload = json.dumps({"type": "job_inserted", "job_id": pc_id})
            conn.execute(select(func.pg_notify(f"procrastinate_queue_v1#{queue}", payload)))
            conn.execute(select(func.pg_notify("procrastinate_any_queue_v1", payload)))
        elif status is None or status.is_terminal:
            end = END_STATES.get(status, "failed") if status is not None else "failed"
            conn.execute(
                text("SELECT procrastinate_finish_job_v1(:id, CAST(:s AS procrastinate_job_status), false)"),
                {"id": pc_id, "s": end},
            )
        # processing: the job's lease decides (it ends, or it expires and is re-queued)

    # -- warm first: a job goes to a free worker that has its model loaded ---------

    def warm_elsewhere(self, model: str, me: str, fresh_s: float) -> str | None:
        """Another worker with ``model`` resident and no job running, as its last beat (within ``fresh_s``)
        said; None when there is none."""
        with self.store.transaction() as conn:
            rows = conn.execute(
                select(workers.c.id, workers.c.warm).where(
                    workers.c.id != me,
                    workers.c.state == "ready",
                    workers.c.current_job.is_(None),
                    workers.c.last_seen > time.time() - fresh_s,
                )
            ).all()
        return next((str(r.id) for r in rows if model in json.loads(r.warm or "[]")), None)

    def notify(self, queue: str) -> None:
        """Wake the workers of ``queue`` (LISTEN): procrastinate notifies on insert, not on retry."""
        payload = json.dumps({"type": "job_inserted"})
        with self.store.transaction() as conn:
            conn.execute(select(func.pg_notify(f"procrastinate_queue_v1#{queue}", payload)))

    def _unwarm(self, conn: Connection, model_wait_s: float, stalled_s: float) -> int:
        """Handed-off jobs go back to their model's queue once they waited ``model_wait_s`` in all, or when
        the worker they were handed to stopped beating: the warm-first preference never holds a job longer."""
        now = time.time()
        moved = conn.execute(
            text(
                "UPDATE procrastinate_jobs p SET queue_name = 'model:' || j.model FROM jobs j "
                "WHERE j.pc_job_id = p.id AND p.status = 'todo' AND p.queue_name LIKE 'warm:%' "
                "AND (j.created_at < :cutoff OR NOT EXISTS (SELECT 1 FROM fluxserve_workers w "
                "WHERE 'warm:' || w.id = p.queue_name AND w.last_seen > :alive)) RETURNING p.id, p.queue_name"
            ),
            {"cutoff": now - model_wait_s, "alive": now - stalled_s},
        ).all()
        for row in moved:
            payload = json.dumps({"type": "job_inserted", "job_id": row.id})
            conn.execute(select(func.pg_notify(f"procrastinate_queue_v1#{row.queue_name}", payload)))
        return len(moved)

    # -- the stall sweep (any node; one at a time) -------------------------------

    def sweep(self, stalled_s: float, model_wait_s: float = 30.0) -> dict[str, int]:
        """Queue rows of workers whose heartbeat stopped go back to do (or end, where our job ended), a
        queued job whose queue row is gone gets a new one, and a job handed to a warm worker goes back to its
        model's queue past the wait bound. Our rows' leases were expired first (JobService)."""
        counts = {"retried": 0, "closed": 0, "redeferred": 0, "unwarmed": 0}
        with self.store.transaction() as conn:
            if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SWEEP_LOCK}).scalar():
                return counts
            counts["unwarmed"] = self._unwarm(conn, model_wait_s, stalled_s)
            # procrastinate's select_stalled_jobs_by_heartbeat, joined to our rows, locked.
            stalled = conn.execute(
                text(
                    "SELECT p.id AS pc, p.queue_name, j.status FROM procrastinate_jobs p "
                    "LEFT JOIN procrastinate_workers w ON w.id = p.worker_id "
                    "LEFT JOIN jobs j ON j.pc_job_id = p.id "
                    "WHERE p.status = 'doing' AND p.task_name = :task "
                    "AND (p.worker_id IS NULL OR w.last_heartbeat < now() - make_interval(secs => :s)) "
                    "FOR UPDATE OF p SKIP LOCKED"
                ),
                {"task": TASK, "s": stalled_s},
            ).all()
            for row in stalled:
                status = Status(row.status) if row.status else None
                if status is Status.PROCESSING:
                    continue
                self._settle_row(conn, row.pc, status, row.queue_name)
                counts["retried" if status is Status.QUEUED else "closed"] += 1
            orphans = conn.execute(
                text(
                    "SELECT j.id, j.model, j.priority, j.route FROM jobs j "
                    "LEFT JOIN procrastinate_jobs p ON p.id = j.pc_job_id "
                    "WHERE j.status = 'queued' AND (p.id IS NULL OR p.status NOT IN ('todo', 'doing')) "
                    "FOR UPDATE OF j SKIP LOCKED"
                )
            ).all()
            for row in orphans:
                self.hooks.defer(conn, row.id, row.model, int(row.priority or 0), row.route)
                counts["redeferred"] += 1
        if any(n for k, n in counts.items() if k != "unwarmed"):
            log.warning("queue sweep: %s", counts)
        elif counts["unwarmed"]:  # the preference's bound at work: normal, not a fault
            log.info("queue sweep: %d handed-off job(s) back to their model's queue", counts["unwarmed"])
        return counts


def models_of(workers: Sequence[Any]) -> list[str]:
    """Every model these workers serve."""
    return sorted({m for w in workers for m in w.models()})


def worker_queues(worker: Any) -> list[str]:
    """The queues one worker fetches from: its own and its models' (a device), or its upstream's."""
    if worker.route:
        return [queue_name("", worker.route)]
    return [warm_queue(worker.worker_id), *(queue_name(m) for m in worker.models())]


def queue_depths(conn: Connection) -> dict[str, int]:
    """Queued jobs per model, as the queues hold them (a job handed to a warm worker counts for its model)."""
    rows = conn.execute(
        text(
            "SELECT CASE WHEN p.queue_name LIKE 'warm:%' THEN 'model:' || j.model ELSE p.queue_name END, count(*) "
            "FROM procrastinate_jobs p LEFT JOIN jobs j ON j.pc_job_id = p.id WHERE p.status = 'todo' GROUP BY 1"
        )
    ).all()
    return {name.removeprefix("model:"): int(n) for name, n in rows if name and name.startswith("model:")}
