"""The PostgreSQL queue without HTTP: procrastinate rows written with ours, cancel, batches, sweeps, NOTIFY."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from fluxserve.job import Job, Status
from fluxserve.jobs import JobService
from fluxserve.migrations import open_store, upgrade
from fluxserve.models import ModelRegistry
from fluxserve.queue.listen import listen
from fluxserve.queue.pg import PgQueue
from fluxserve.queue.pg.rows import PgHooks, queue_depths
from fluxserve.store import Store


@pytest.fixture
def jobs(pg_url: str) -> Iterator[JobService]:
    store = open_store(pg_url, queue=PgHooks(pg_url))
    service = JobService(store, lease_s=5.0)
    yield service
    service.close()
    store.close()


def _spec(model: str = "flux-dev", **kw: object):  # type: ignore[no-untyped-def]
    return ModelRegistry.default().get(model).make_spec(prompt="p", width=256, height=256, seed=1, **kw)


def _submit(jobs: JobService, owner: str = "o", model: str = "flux-dev", **kwargs: object) -> Job:
    return jobs.submit_sync(owner, "vmodel", _spec(model), {"x": 1}, **kwargs)  # type: ignore[arg-type]


PC = "jobs j JOIN procrastinate_jobs p ON p.id = j.pc_job_id"


def _pc(jobs: JobService, job_id: str) -> tuple[str, str, int]:
    with jobs.store.transaction() as conn:
        row = conn.execute(
            text(f"SELECT p.status, p.queue_name, p.priority FROM {PC} WHERE j.id = :id"),
            {"id": job_id},
        ).one()
    return str(row.status), str(row.queue_name), int(row.priority)


def _count(jobs: JobService, table: str) -> int:
    with jobs.store.transaction() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_a_job_and_its_queue_entry_commit_together_or_not_at_all(
    jobs: JobService, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _submit(jobs, idempotency_key="k1")
    assert _pc(jobs, job.id) == ("todo", "model:flux-dev", -1)
    # A replay (same key, same request) is the same job, with no second queue entry.
    assert _submit(jobs, idempotency_key="k1").id == job.id
    assert (_count(jobs, "jobs"), _count(jobs, "procrastinate_jobs")) == (1, 1)

    # The create fails after the queue row was written: neither row stays.
    hooks = jobs.store.queue
    assert isinstance(hooks, PgHooks)

    def broken(conn: object, job: object, priority: int) -> dict[str, object]:
        PgHooks.deferred(hooks, conn, job, priority)  # type: ignore[arg-type]
        raise RuntimeError("the database went away between the two statements")

    monkeypatch.setattr(hooks, "deferred", broken)
    with pytest.raises(RuntimeError):
        _submit(jobs, idempotency_key="k2")
    assert (_count(jobs, "jobs"), _count(jobs, "procrastinate_jobs")) == (1, 1)


def test_keys_take_turns_through_the_priority_and_positions_follow_the_fetch_order(jobs: JobService) -> None:
    flood = [_submit(jobs, "a") for _ in range(5)]
    newcomer = _submit(jobs, "b")
    other_model = _submit(jobs, "c", model="flux-schnell")
    assert [_pc(jobs, j.id)[2] for j in flood] == [-1, -2, -3, -4, -5]
    assert _pc(jobs, newcomer.id)[2] == -1
    # procrastinate fetches by priority, then id: a's first job, then b's, then a's others.
    assert jobs.get_sync(flood[0].id, "a").queue_position == 1
    assert jobs.get_sync(newcomer.id, "b").queue_position == 2
    assert jobs.get_sync(flood[4].id, "a").queue_position == 6
    assert jobs.get_sync(other_model.id, "c").queue_position == 1  # its own model's queue
    with jobs.store.transaction() as conn:
        assert queue_depths(conn) == {"flux-dev": 6, "flux-schnell": 1}


def test_cancel_of_a_queued_job_cancels_its_entry_and_of_a_running_one_asks_to_abort(jobs: JobService) -> None:
    queued, running = _submit(jobs), _submit(jobs)
    assert jobs.cancel_sync(queued.id, "o").status is Status.CANCELED
    assert _pc(jobs, queued.id)[0] == "cancelled"  # never fetched
    with jobs.store.transaction() as conn:  # what procrastinate's fetch does for a worker
        conn.execute(
            text(
                "UPDATE procrastinate_jobs p SET status = 'doing' FROM jobs j WHERE j.pc_job_id = p.id AND j.id = :id"
            ),
            {"id": running.id},
        )
    assert jobs.claim_id(running.id, "w1") is not None
    assert jobs.cancel_sync(running.id, "o").cancel_requested
    with jobs.store.transaction() as conn:
        abort = conn.execute(text(f"SELECT p.abort_requested FROM {PC} WHERE j.id = :id"), {"id": running.id}).scalar()
    assert abort is True


def test_a_queued_job_past_its_deadline_leaves_the_queue(jobs: JobService) -> None:
    job = _submit(jobs, deadline=time.time() - 1)
    assert jobs.expire() == (1, 0, 0)
    assert jobs.store.get_job(job.id).status is Status.ABORTED  # type: ignore[union-attr]
    assert _pc(jobs, job.id)[0] == "cancelled"


def test_two_workers_claiming_batches_at_once_never_share_a_job(jobs: JobService) -> None:
    queue = PgQueue(jobs.store)
    leads = [_submit(jobs) for _ in range(2)]
    members = [_submit(jobs) for _ in range(12)]
    with jobs.store.transaction() as conn:
        conn.execute(
            text(
                "UPDATE procrastinate_jobs p SET status = 'doing' FROM jobs j WHERE j.pc_job_id = p.id "
                "AND j.id = ANY(:ids)"
            ),
            {"ids": [j.id for j in leads]},
        )
    claimed_leads = [jobs.claim_id(j.id, f"w{i}") for i, j in enumerate(leads)]
    got: dict[int, list[str]] = {}
    barrier = threading.Barrier(2)

    def claim(i: int) -> None:
        lead = claimed_leads[i]
        assert lead is not None
        barrier.wait()
        got[i] = [j.id for j in jobs.claim_compatible(lead, f"w{i}", 8, queue.member_lock(None))]

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Each batch holds at most 7 members (8 images with the lead); what one took, the other skipped.
    assert set(got[0]).isdisjoint(got[1]) and 7 <= len(got[0]) + len(got[1]) <= 12
    assert all(len(g) <= 7 for g in got.values())
    taken = got[0] + got[1]
    assert all(_pc(jobs, j)[0] == "doing" and jobs.store.get_job(j).status is Status.PROCESSING for j in taken)  # type: ignore[union-attr]
    assert all(_pc(jobs, m.id)[0] == "todo" for m in members if m.id not in taken)
    # Members end (or go back), and the lead's task settles their queue rows to match.
    first, rest = taken[:2], taken[2:]
    for job_id in first:
        job = jobs.store.get_job(job_id)
        assert job is not None and jobs.finish_canceled(job)
    job = jobs.store.get_job(rest[0])
    assert job is not None and jobs.requeue(job, "shutdown", give_back_attempt=True)
    queue.settle(first + rest[:1])
    assert [_pc(jobs, j)[0] for j in first + rest[:1]] == ["aborted", "aborted", "todo"]


def test_the_sweep_gives_back_a_dead_workers_jobs_and_redefers_orphans(jobs: JobService) -> None:
    queue = PgQueue(jobs.store)
    dead, orphan = _submit(jobs), _submit(jobs)
    with jobs.store.transaction() as conn:
        # A worker that registered, fetched one job, then stopped beating.
        stale = "INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now() - interval '1 hour') RETURNING id"
        worker = conn.execute(text(stale)).scalar()
        conn.execute(
            text(
                "UPDATE procrastinate_jobs p SET status = 'doing', worker_id = :w FROM jobs j "
                "WHERE j.pc_job_id = p.id AND j.id = :id"
            ),
            {"w": worker, "id": dead.id},
        )
        # A queued job whose entry ended (a task that returned after its lease was taken).
        conn.execute(
            text(
                "UPDATE procrastinate_jobs p SET status = 'succeeded' FROM jobs j "
                "WHERE j.pc_job_id = p.id AND j.id = :id"
            ),
            {"id": orphan.id},
        )
    claimed = jobs.claim_id(dead.id, "gone")
    assert claimed is not None
    # While our lease holds, the sweep leaves the job alone; once it expired, the job and its entry go back.
    assert queue.sweep(stalled_s=1) == {"retried": 0, "closed": 0, "redeferred": 1, "unwarmed": 0}
    assert _pc(jobs, dead.id)[0] == "doing"
    jobs.expire(now=time.time() + 60)
    assert queue.sweep(stalled_s=1) == {"retried": 1, "closed": 0, "redeferred": 0, "unwarmed": 0}
    assert _pc(jobs, dead.id)[0] == "todo" and _pc(jobs, orphan.id)[0] == "todo"
    assert jobs.store.get_job(dead.id).status is Status.QUEUED  # type: ignore[union-attr]


def test_a_job_handed_to_a_warm_worker_goes_back_past_the_wait_bound_or_when_it_stops(jobs: JobService) -> None:
    queue = PgQueue(jobs.store)
    young, old, orphaned = _submit(jobs), _submit(jobs), _submit(jobs)
    now = time.time()
    with jobs.store.transaction() as conn:
        conn.execute(
            text(
                "INSERT INTO fluxserve_workers (id, host, pid, device, models, warm, state, started_at, last_seen) "
                "VALUES ('w-alive', 'h', 1, 'cpu', '[\"flux-dev\"]', '[\"flux-dev\"]', 'ready', :t, :t)"
            ),
            {"t": now},
        )
        for job, target, age in ((young, "w-alive", 0), (old, "w-alive", 120), (orphaned, "w-gone", 0)):
            conn.execute(text("UPDATE jobs SET created_at = :c WHERE id = :id"), {"c": now - age, "id": job.id})
            conn.execute(
                text(
                    "UPDATE procrastinate_jobs p SET queue_name = :q FROM jobs j "
                    "WHERE j.pc_job_id = p.id AND j.id = :id"
                ),
                {"q": f"warm:{target}", "id": job.id},
            )
    assert queue.warm_elsewhere("flux-dev", "w-other", fresh_s=5) == "w-alive"
    assert queue.warm_elsewhere("flux-dev", "w-alive", fresh_s=5) is None  # not to itself
    assert queue.warm_elsewhere("flux-schnell", "w-other", fresh_s=5) is None
    assert queue_depths_now(jobs) == {"flux-dev": 3}  # handed off, still counted for their model
    assert queue.sweep(stalled_s=5, model_wait_s=60)["unwarmed"] == 2
    assert _pc(jobs, young.id)[1] == "warm:w-alive"  # within the bound, its warm worker alive: stays
    assert _pc(jobs, old.id)[1] == "model:flux-dev" and _pc(jobs, orphaned.id)[1] == "model:flux-dev"


def queue_depths_now(jobs: JobService) -> dict[str, int]:
    with jobs.store.transaction() as conn:
        return queue_depths(conn)


def test_every_node_on_a_database_gets_the_same_secret(pg_url: str) -> None:
    a, b = Store(pg_url), Store(pg_url)
    try:
        assert a.shared_secret() == b.shared_secret() and len(a.shared_secret()) == 32
    finally:
        a.close()
        b.close()


def test_upgrade_is_idempotent_and_nodes_refuse_an_unupgraded_database(pg_url: str, pg_server: str) -> None:
    from fluxserve.migrations import SchemaOutOfDate
    from tests.support.pg import new_database

    store = Store(pg_url)
    try:
        assert upgrade(store.engine) == []  # the fixture upgraded it already
    finally:
        store.close()
    with pytest.raises(SchemaOutOfDate, match="fluxserve db upgrade"):
        open_store(new_database(pg_server))


def test_changes_committed_elsewhere_reach_listeners(jobs: JobService, pg_url: str) -> None:
    got: list[tuple[str, str]] = []

    async def main() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(listen(pg_url, lambda job_id, event, _hooked: got.append((job_id, event)), ready))
        await asyncio.wait_for(ready.wait(), 10)
        job = await asyncio.to_thread(_submit, jobs)
        await asyncio.to_thread(jobs.cancel_sync, job.id, "o")
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        got.append((job.id, "-"))

    asyncio.run(main())
    job_id = got[-1][0]
    assert got[:-1] == [(job_id, "submitted"), (job_id, "canceled")]


def test_routes_choose_the_queue_and_spill_and_failover_move_the_row(jobs: JobService, tmp_path: object) -> None:
    from pathlib import Path

    toml = Path(str(tmp_path)) / "u.toml"
    toml.write_text(
        '[upstreams.bfl]\nkind = "bfl"\nbase_url = "https://api.bfl.ai"\n'
        '[upstreams.rep]\nkind = "replicate"\nbase_url = "https://api.replicate.com"\n'
        '[models.flux-pro]\nupstream = "bfl"\nfallback = ["rep"]\n'
        '[models.flux-dev]\nspill_to = "rep"\nspill_after_s = 0\n'
    )
    registry = ModelRegistry.default().layered(toml)
    jobs.registry = registry
    pro = jobs.submit_sync("o", "vmodel", registry.get("flux-pro").make_spec(prompt="p", width=256, height=256), {})
    assert _pc(jobs, pro.id)[:2] == ("todo", "upstream:bfl")
    dev = _submit(jobs)
    assert _pc(jobs, dev.id)[:2] == ("todo", "model:flux-dev")
    assert jobs.spill() == 1 and jobs.spill() == 0
    assert _pc(jobs, dev.id)[:2] == ("todo", "upstream:rep")
    claimed = jobs.claim_id(pro.id, "w")
    assert claimed is not None and jobs.reroute(claimed, "rep", "bfl down")
    assert _pc(jobs, pro.id)[1] == "upstream:rep"  # procrastinate's retry keeps the moved queue name


def test_per_key_limits_and_credits_hold_under_20_concurrent_creates(pg_url: str) -> None:
    from fluxserve.errors import RateLimited
    from fluxserve.limits import Limits

    store = open_store(pg_url, pool_size=20, pool_overflow=0, queue=PgHooks(pg_url))
    jobs = JobService(store, limits=Limits(), threads=1)
    store.add_key("k1", "limited", "a" * 64, "fs-")
    store.set_key_limits("k1", Limits(max_queued=2))
    outcomes: list[str] = []
    start = threading.Barrier(20)

    def create() -> None:
        start.wait()
        try:
            _submit(jobs, owner="k1")
            outcomes.append("admitted")
        except RateLimited:
            outcomes.append("limited")

    threads = [threading.Thread(target=create) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes).count("admitted") == 2 and outcomes.count("limited") == 18  # was 8 of 8 before
    jobs.close()
    store.close()


def test_leases_use_the_database_clock_so_a_skewed_node_requeues_nothing_live(
    jobs: JobService, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _submit(jobs)
    claimed = jobs.claim_id(job.id, "worker-on-a-good-clock")
    assert claimed is not None
    real = time.time
    # Another node's sweeper whose clock runs an hour fast: by its clock every lease has long expired.
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    assert jobs.expire() == (0, 0, 0)
    assert jobs.renew([claimed], "worker-on-a-good-clock") == {job.id}
    monkeypatch.setattr(time, "time", real)
    current = jobs.store.get_job(job.id)
    assert current is not None and current.status is Status.PROCESSING and current.attempts == 1
    # Its lease, by the database's clock, still runs out when the worker stops renewing.
    assert jobs.expire(now=jobs.store.now() + jobs.lease_s + 1) == (0, 1, 0)


def test_a_key_revoked_on_one_node_is_forgotten_by_every_node_at_once(pg_url: str) -> None:
    from fluxserve.auth import Authenticator, create_key
    from fluxserve.errors import Unauthorized
    from fluxserve.store import KEYS_CHANGED

    store = Store(pg_url)
    other = Store(pg_url)  # another node's store
    try:
        key = create_key(store, "ci")
        node = Authenticator(store, None, cache_s=3600.0)  # only the NOTIFY can make it forget
        assert node.owner_for(key.key) == key.id

        async def main() -> None:
            ready = asyncio.Event()
            forgot = asyncio.Event()

            def on_change(job_id: str, _event: str, _hooked: bool) -> None:
                if job_id == KEYS_CHANGED:
                    node.forget()
                    forgot.set()

            task = asyncio.create_task(listen(pg_url, on_change, ready))
            await asyncio.wait_for(ready.wait(), 10)
            assert await asyncio.to_thread(other.revoke_key, "ci") == 1
            await asyncio.wait_for(forgot.wait(), 10)
            task.cancel()

        asyncio.run(main())
        with pytest.raises(Unauthorized):
            node.owner_for(key.key)
    finally:
        store.close()
        other.close()
