"""The job core without HTTP: transitions fenced by status, attempt and worker; events; leases; migrations."""

import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import event, inspect

from fluxserve.api.replicate import WEBHOOKS as REPLICATE_WEBHOOKS
from fluxserve.auth import Authenticator, create_key
from fluxserve.errors import StoreUnavailable, Unauthorized
from fluxserve.job import EventKind, Job, Output, Status, new_job_id
from fluxserve.jobs import JobService
from fluxserve.migrations import LATEST, current_version, open_store, upgrade
from fluxserve.models import ModelRegistry
from fluxserve.store import Store, db
from fluxserve.store.db import BUSY_S, BUSY_SLACK_S


def _spec():  # type: ignore[no-untyped-def]
    return ModelRegistry.default().get("flux").make_spec(prompt="p", width=256, height=256, seed=1)


def _service(tmp_path: Path, **kwargs: float) -> JobService:
    return JobService(open_store(f"sqlite:///{tmp_path / 'db.sqlite'}"), **kwargs)  # type: ignore[arg-type]


def _submit(jobs: JobService, owner: str = "o", **kwargs: object) -> Job:
    return jobs.submit_sync(owner, "vmodel", _spec(), {"x": 1}, **kwargs)  # type: ignore[arg-type]


def _kinds(jobs: JobService, job_id: str) -> list[str]:
    return [e.kind.value for e in jobs.store.events(job_id)]


def test_claim_order_complete_and_events(tmp_path: Path) -> None:
    jobs = _service(tmp_path)
    a = _submit(jobs)
    b = _submit(jobs)
    assert jobs.store.queue_depth() == 2
    assert jobs.get_sync(b.id, "o").queue_position == 2
    claimed = jobs.claim("w1")
    assert claimed is not None and claimed.id == a.id
    assert claimed.status is Status.PROCESSING and claimed.attempts == 1 and claimed.worker_id == "w1"
    assert claimed.lease_expires_at is not None and claimed.lease_expires_at > time.time()
    assert jobs.progress([claimed], 2, 4)[0] is not None
    assert jobs.complete(claimed, [Output(f"{a.id}/out-0.png", 1, 256, 256, "png")])
    got = jobs.get_sync(a.id, "o")
    assert got.status is Status.SUCCEEDED and got.progress_done == 2 and got.outputs[0].seed == 1
    assert got.request == {"x": 1} and got.spec == a.spec
    assert _kinds(jobs, a.id) == ["submitted", "started", "progress", "succeeded"]
    events = jobs.store.events(a.id)
    assert events[2].payload == {"step": 2, "total": 4} and events[3].payload["outputs"] == [f"{a.id}/out-0.png"]
    assert all(e.attempt == (0 if e.kind is EventKind.SUBMITTED else 1) for e in events)


def test_keys_take_turns_and_positions_follow_the_claim_order(tmp_path: Path) -> None:
    jobs = _service(tmp_path)
    flood = [_submit(jobs, "a") for _ in range(30)]
    b1 = _submit(jobs, "b")
    # Before anything runs, b's job is second: after a's oldest, ahead of a's 29 others.
    assert jobs.get_sync(b1.id, "b").queue_position == 2
    assert jobs.get_sync(flood[1].id, "a").queue_position == 3
    running = jobs.claim("w1")
    assert running is not None and running.id == flood[0].id
    # a has a job running, so b's turn comes first.
    assert jobs.get_sync(b1.id, "b").queue_position == 1
    c1, c2 = _submit(jobs, "c"), _submit(jobs, "c")
    # Every position a client reads is the place the job is then claimed in.
    expected = {j.id: jobs.get_sync(j.id, j.owner).queue_position for j in [*flood[1:], b1, c1, c2]}
    order: list[str] = []
    while (job := jobs.claim(f"w{len(order)}")) is not None:
        order.append(job.owner)
        assert expected[job.id] == len(order), (job.owner, expected[job.id], len(order))
    # Turns: b and c (never served) before a's second job; c's second after a's second.
    assert order[:5] == ["b", "c", "a", "c", "a"] and order.count("a") == 29


def test_fair_order_keeps_batches_and_model_filters(tmp_path: Path) -> None:
    jobs = _service(tmp_path)
    for _ in range(3):
        _submit(jobs, "a")
    b = _submit(jobs, "b")
    lead = jobs.claim("w1")
    assert lead is not None and lead.owner == "a"
    # Companions for the batch come in fair order too: b's job before a's later ones.
    companions = jobs.claim_compatible(lead, "w1", max_images=3)
    assert [j.owner for j in companions] == ["b", "a"] and companions[0].id == b.id
    assert jobs.claim("w2", models={"flux-schnell"}) is None  # only flux-dev jobs are queued


def test_a_worker_whose_lease_was_taken_cannot_complete_or_fail(tmp_path: Path) -> None:
    jobs = _service(tmp_path, lease_s=0.2)
    job = _submit(jobs)
    stale = jobs.claim("w1")
    assert stale is not None
    time.sleep(0.3)
    assert jobs.expire() == (0, 1, 0)  # w1 stopped renewing: back to the queue
    fresh = jobs.claim("w2")
    assert fresh is not None and fresh.attempts == 2 and fresh.worker_id == "w2"
    out = [Output(f"{job.id}/out-0.png", 1, 256, 256, "png")]
    assert jobs.progress([stale], 1, 4) == [None]
    assert not jobs.complete(stale, out)
    assert not jobs.fail(stale, "boom")
    assert not jobs.requeue(stale, "shutdown", give_back_attempt=True)
    assert jobs.get_sync(job.id, "o").status is Status.PROCESSING
    assert jobs.complete(fresh, out)
    assert jobs.get_sync(job.id, "o").status is Status.SUCCEEDED
    assert not jobs.complete(fresh, out)  # a job ends once


def test_renewed_lease_is_not_reaped(tmp_path: Path) -> None:
    jobs = _service(tmp_path, lease_s=0.3)
    _submit(jobs)
    claimed = jobs.claim("w1")
    assert claimed is not None
    for _ in range(4):
        time.sleep(0.15)
        assert jobs.renew([claimed], "w1") == {claimed.id}
        assert jobs.expire() == (0, 0, 0)
    assert jobs.renew([claimed], "someone-else") == set()


def test_expired_leases_requeue_then_fail_past_max_attempts(tmp_path: Path) -> None:
    jobs = _service(tmp_path, lease_s=0.1, max_attempts=2)
    job = _submit(jobs)
    assert jobs.claim("w1") is not None
    time.sleep(0.15)
    assert jobs.expire() == (0, 1, 0)
    assert jobs.claim("w2") is not None
    time.sleep(0.15)
    assert jobs.expire() == (0, 0, 1)
    failed = jobs.get_sync(job.id, "o")
    assert failed.status is Status.FAILED and "2 times" in (failed.error or "")
    assert _kinds(jobs, job.id) == ["submitted", "started", "requeued", "started", "failed"]


def test_clean_requeue_gives_the_attempt_back(tmp_path: Path) -> None:
    jobs = _service(tmp_path)
    _submit(jobs)
    first = jobs.claim("w1")
    assert first is not None and jobs.requeue(first, "shutdown", give_back_attempt=True)
    again = jobs.claim("w1")
    assert again is not None and again.attempts == 1


def test_cancel_of_queued_job_is_immediate_and_of_running_job_is_flagged(tmp_path: Path) -> None:
    jobs = _service(tmp_path)
    queued = _submit(jobs)
    assert jobs.cancel_sync(queued.id, "o").status is Status.CANCELED
    assert jobs.claim("w1") is None
    running = _submit(jobs)
    claimed = jobs.claim("w1")
    assert claimed is not None and claimed.id == running.id
    assert jobs.cancel_sync(running.id, "o").status is Status.PROCESSING
    assert jobs.is_cancel_requested(running.id)
    assert jobs.finish_canceled(claimed)
    assert _kinds(jobs, running.id)[-2:] == ["cancel_requested", "canceled"]


def test_a_completion_after_an_accepted_cancel_ends_canceled_and_a_lost_claim_ends_nothing(tmp_path: Path) -> None:
    """The success is fenced on the cancel flag in its own statement: the images arrived, but the client was
    told its cancel was accepted, so the job ends canceled (its outputs unrecorded); a stale claim changes
    nothing either way."""
    jobs = _service(tmp_path)
    out = [Output("x/out-0.png", 1, 256, 256, "png")]
    job = _submit(jobs)
    claimed = jobs.claim("w1")
    assert claimed is not None
    jobs.cancel_sync(job.id, "o")
    assert jobs.complete(claimed, out)
    done = jobs.get_sync(job.id, "o")
    assert done.status is Status.CANCELED and not done.outputs
    assert _kinds(jobs, job.id)[-2:] == ["cancel_requested", "canceled"]
    assert not jobs.complete(claimed, out)  # already ended: nothing changes
    other = _submit(jobs)
    first = jobs.claim("w1")
    assert first is not None and first.id == other.id
    assert jobs.requeue(first, "lost", give_back_attempt=False)
    assert not jobs.complete(first, out)  # its claim is gone (no cancel asked): refused, still queued
    assert jobs.get_sync(other.id, "o").status is Status.QUEUED
    second = jobs.claim("w2")
    assert second is not None and jobs.complete(second, out)
    assert jobs.get_sync(other.id, "o").status is Status.SUCCEEDED


def test_deadline_aborts_a_queued_job(tmp_path: Path) -> None:
    jobs = _service(tmp_path)
    job = _submit(jobs, deadline=time.time() - 1)
    assert jobs.expire() == (1, 0, 0)
    assert jobs.get_sync(job.id, "o").status is Status.ABORTED


def test_other_owner_sees_nothing(tmp_path: Path) -> None:
    from fluxserve.errors import NotFound

    jobs = _service(tmp_path)
    job = _submit(jobs)
    with pytest.raises(NotFound):
        jobs.get_sync(job.id, "someone-else")
    with pytest.raises(NotFound):
        jobs.get_sync(job.id, "o", dialect="openai")


def test_webhook_deliveries_are_written_with_the_transition_and_throttled(tmp_path: Path) -> None:
    # The dialects' rules, as app.store_options builds every store.
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}", webhook_rules={"vmodel": REPLICATE_WEBHOOKS})
    jobs = JobService(store)
    webhook = {"url": "https://example.com/hook", "events": ["start", "logs", "completed"]}
    job = _submit(jobs, webhook=webhook)
    claimed = jobs.claim("w1")
    assert claimed is not None
    for step in range(1, 5):
        jobs.progress([claimed], step, 4)
    jobs.complete(claimed, [])
    rows = jobs.store.deliveries(job.id)
    # One pending logs delivery carries every step (it renders when sent); no output event was asked for.
    assert [r.event for r in rows] == ["start", "logs", "completed"]
    assert len({r.msg_id for r in rows}) == 3 and all(r.receiver == "https://example.com:443" for r in rows)
    # In order per job, whichever sender asks: a later delivery waits for the earlier ones to be done.
    until = time.time() + 60
    assert not jobs.store.claim_delivery(rows[1].id, until)
    assert jobs.store.claim_delivery(rows[0].id, until)
    assert not jobs.store.claim_delivery(rows[0].id, until)  # claimed once
    assert not jobs.store.claim_delivery(rows[1].id, until)  # the first is in flight
    jobs.store.update_delivery(rows[0].id, state="delivered", claimed_until=None)
    assert jobs.store.claim_delivery(rows[1].id, until)


def test_a_locked_database_is_store_unavailable_not_a_crash(tmp_path: Path) -> None:
    jobs = _service(tmp_path)
    job = _submit(jobs)
    holder = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert jobs.get_sync(job.id, "o").status is Status.QUEUED  # WAL: reads go on
        with pytest.raises(StoreUnavailable, match="locked"):
            jobs.claim("w1")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert jobs.claim("w1") is not None


def test_a_write_sets_sqlites_lock_wait_only_when_its_deadline_moves_it(tmp_path: Path) -> None:
    """A write's wait for another process's lock is what is left of its one deadline (BUSY_S), set on the
    connection only where that moves it by more than BUSY_SLACK_S: no statement on an ordinary write."""
    store = _service(tmp_path).store
    with store.engine.begin() as conn:

        def now_ms() -> int:
            return int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one())

        assert now_ms() == BUSY_S * 1000
        Store._busy_timeout(conn, BUSY_S - 0.01)  # this process's own queue took 10 ms: left as it is
        assert now_ms() == BUSY_S * 1000
        Store._busy_timeout(conn, BUSY_S - 3)  # 3 s of it spent waiting for this process's writers
        assert now_ms() == (BUSY_S - 3) * 1000
        Store._busy_timeout(conn, BUSY_S - 3 + BUSY_SLACK_S / 2)
        assert now_ms() == (BUSY_S - 3) * 1000
        Store._busy_timeout(conn, BUSY_S)  # the next write has its whole deadline again
        assert now_ms() == BUSY_S * 1000


def test_migrations_are_numbered_idempotent_and_upgrade_an_old_database(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)  # the jobs table as the first release created it, without later columns
    old.execute(
        "CREATE TABLE jobs (id VARCHAR(32) PRIMARY KEY, owner VARCHAR(64) NOT NULL, dialect VARCHAR(16) NOT NULL,"
        " model VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, spec TEXT NOT NULL, request TEXT NOT NULL,"
        " created_at FLOAT NOT NULL, started_at FLOAT, completed_at FLOAT, attempts INTEGER NOT NULL,"
        " progress_done INTEGER NOT NULL, progress_total INTEGER NOT NULL, outputs TEXT NOT NULL, error TEXT,"
        " cancel_requested BOOLEAN NOT NULL)"
    )
    old.execute(
        "CREATE TABLE api_keys (id VARCHAR(16) PRIMARY KEY, name VARCHAR(128) NOT NULL, key_hash VARCHAR(64) NOT NULL"
        " UNIQUE, prefix VARCHAR(16) NOT NULL, created_at FLOAT NOT NULL, revoked_at FLOAT)"
    )
    old.commit()
    old.close()
    store = Store(f"sqlite:///{path}")
    assert current_version(store.engine) == 0
    assert upgrade(store.engine) == [
        "1: jobs and api keys",
        "2: worker leases, job events, webhook outbox",
        "3: per-key limits, image counts",
        "4: file retention, encoding time",
        "5: queue rows, shared secret, worker registry",
        "6: fair priority",
        "7: upstream routes, credits",
        "8: replicate files",
        "9: job notes, admin keys",
        "10: warm models per worker",
        "11: per-job retention",
        "12: batches",
        "13: a key's active jobs by index",
        "14: watermark marks",
        "15: licence usage outbox",
        "16: the queue's order by index",
    ]
    assert upgrade(store.engine) == []
    assert current_version(store.engine) == LATEST
    columns = {c["name"] for c in inspect(store.engine).get_columns("jobs")}
    added = {
        "previews",
        "webhook",
        "worker_id",
        "lease_expires_at",
        "images",
        "megapixels",
        "files_expired_at",
        "encode_s",
        "pc_job_id",
        "route",
        "cost",
        "error_code",
        "note",
        "mark",
    }
    assert added <= columns
    key_columns = {c["name"] for c in inspect(store.engine).get_columns("api_keys")}
    assert {"max_queued", "rpm", "images_per_day", "admin"} <= key_columns
    jobs = JobService(store)
    assert _submit(jobs).status is Status.QUEUED


def test_keys_are_hashed_and_revocable(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    new = create_key(store, "ci")
    rows = store.list_keys()
    assert len(rows) == 1 and new.key not in str(tuple(rows[0]))
    auth = Authenticator(store, env_key="env-secret")
    assert auth.owner_for(new.key) == new.id
    assert auth.owner_for("env-secret").startswith("env_")
    for bad in [None, "", "wrong", new.key + "x"]:
        with pytest.raises(Unauthorized):
            auth.owner_for(bad)
    assert store.revoke_key("ci") == 1
    with pytest.raises(Unauthorized):
        auth.owner_for(new.key)
    assert new_job_id() != new_job_id()


def test_a_stale_claim_neither_renews_nor_releases_a_later_claim(tmp_path: Path) -> None:
    # A job re-claimed by the same worker (attempt 2) must stay held when its stale attempt 1 ends:
    # before, renew matched by job id and release popped by job id, and a healthy job ran out of lease.
    from fluxserve.storage import LocalStorage
    from fluxserve.workers import DeviceWorker
    from tests.support.fakes import FakeEngine

    jobs = _service(tmp_path, lease_s=0.2)
    _submit(jobs)
    stale = jobs.claim("w1")
    assert stale is not None
    time.sleep(0.3)
    assert jobs.expire() == (0, 1, 0)
    fresh = jobs.claim("w1")
    assert fresh is not None and fresh.attempts == 2
    assert jobs.renew([stale], "w1") == set()  # fenced by attempt
    assert jobs.renew([fresh], "w1") == {fresh.id}
    storage = LocalStorage(tmp_path / "files", b"k" * 32, "http://127.0.0.1", 60)
    worker = DeviceWorker(jobs, storage, FakeEngine(), ModelRegistry.default())
    worker._hold([fresh])
    worker._release(stale)  # the stale attempt ends
    assert worker._held == {fresh.id: fresh}
    worker._release(fresh)
    assert worker._held == {}


def test_a_database_servers_error_names_no_host_or_user_to_clients() -> None:
    # Its text ("connection to server at 127.0.0.1, port 1 failed ... user") reached 503 bodies before.
    store = Store("postgresql+psycopg://secret_user@127.0.0.1:1/secret_db")
    try:
        with pytest.raises(StoreUnavailable) as err:
            store.ping()
    finally:
        store.close()
    message = err.value.message
    assert "OperationalError" in message and "server log" in message
    assert "secret_user" not in message and "127.0.0.1" not in message and "secret_db" not in message


def test_one_receivers_backlog_never_fills_the_due_window(tmp_path: Path) -> None:
    from fluxserve.store import webhook_deliveries

    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    now = time.time()
    rows = [("https://busy.example:443", now - 100 + i) for i in range(80)] + [("https://quiet.example:443", now)]
    with store.transaction() as conn:
        for i, (receiver, due) in enumerate(rows):
            conn.execute(
                webhook_deliveries.insert().values(
                    msg_id=f"msg_{i}",
                    job_id=f"job{i}",
                    event="completed",
                    receiver=receiver,
                    state="pending",
                    attempts=0,
                    due_at=due,
                    created_at=due,
                )
            )
    due = store.due_deliveries(now + 1, limit=50)
    receivers = [r.receiver for r in due]
    assert "https://quiet.example:443" in receivers  # was left out: 80 older rows of one receiver came first
    assert receivers.count("https://busy.example:443") == 4


def test_a_dripping_webhook_receiver_is_cut_at_the_total_deadline() -> None:
    from http.server import BaseHTTPRequestHandler

    from fluxserve.webhooks import post_within
    from tests.support.image_server import serve_loopback

    class Drip(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            try:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                    self.wfile.write(bytes([byte]))  # each byte well inside a read timeout, the whole far past it
                    self.wfile.flush()
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                return  # the sender hung up at its deadline: what this test wants

        def log_message(self, *args: object) -> None:
            pass

    with serve_loopback(Drip) as base:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            post_within(f"{base}/hook", b"{}", {"content-type": "application/json"}, {}, 1.0)
        assert time.monotonic() - start < 2.0


def test_a_create_counts_its_keys_active_jobs_by_index_not_by_its_history(tmp_path: Path) -> None:
    """The fair priority and the limits count a key's queued and running jobs at every create (issue 38): by
    the (owner, status) index, so a key with 50,000 finished jobs creates as fast as a new one."""
    from sqlalchemy import text

    from fluxserve.store import fairness

    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        with store.transaction() as conn:
            plan = conn.execute(
                text(
                    "EXPLAIN QUERY PLAN SELECT count(*) FROM jobs "
                    "WHERE owner = 'o' AND status IN ('queued', 'processing')"
                )
            ).all()
            assert any("ix_jobs_owner_status" in str(row) for row in plan), plan
            assert fairness.priority(conn, "o") == -1
    finally:
        store.close()


def test_a_queued_jobs_position_counts_over_the_queue_order_index(tmp_path: Path) -> None:
    """Every poll of a queued job reads its position (issue 38): both counts range over the queue-order index
    (migration 16) rather than reading each queued row, and the answer is the fetch order's."""
    from sqlalchemy import text

    from fluxserve.store import fairness

    jobs = _service(tmp_path)
    with jobs.store.transaction() as conn:
        plan = conn.execute(text("EXPLAIN QUERY PLAN " + str(fairness._AHEAD)), {"id": "x"}).all()
    searches = [str(row) for row in plan if "SEARCH o " in str(row)]
    assert len(searches) == 2 and all("ix_jobs_queue_order" in s for s in searches), plan
    a1, a2, a3 = (_submit(jobs, "a") for _ in range(3))
    b1 = _submit(jobs, "b")  # the newcomer's first job goes ahead of a's second (same priority as a1, later)
    assert [jobs.get_sync(j.id, j.owner).queue_position for j in (a1, b1, a2, a3)] == [1, 2, 3, 4]
    jobs.store.close()


def test_a_jobs_insert_events_and_transitions_go_through_sqlites_driver_as_sqlalchemy_sends_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """store.db.send: the statements on every job's way skip SQLAlchemy's execution on SQLite (no cursor event
    of its own) and give the same rows, types and errors: the claimed job as its UPDATE ... RETURNING gave it
    agrees with the row read back through SQLAlchemy; a duplicate idempotency key is still a replay; a locked
    file is still StoreUnavailable."""
    monkeypatch.setattr(db, "BUSY_S", 0.5)
    jobs = _service(tmp_path)
    through: list[str] = []
    event.listen(jobs.store.engine, "before_cursor_execute", lambda *a: through.append(a[2].split()[0]))
    job = _submit(jobs, idempotency_key="k1")
    claimed = jobs.claim_id(job.id, "w1")
    assert claimed is not None
    read = jobs.store.get_job(job.id)
    assert read is not None and claimed == replace(read, queue_position=claimed.queue_position)
    assert type(claimed.cancel_requested) is bool and type(claimed.created_at) is float
    assert (claimed.status, claimed.attempts, claimed.worker_id) == (Status.PROCESSING, 1, "w1")
    assert jobs.complete(claimed, [Output("a/out-0.png", 1, 8, 8, "png")])
    assert "INSERT" not in through and "UPDATE" not in through, through  # only the reads are SQLAlchemy's
    assert _submit(jobs, idempotency_key="k1").id == job.id  # the unique index's error, read as a replay
    holder = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            _submit(jobs)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
