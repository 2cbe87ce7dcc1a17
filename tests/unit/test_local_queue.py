"""The embedded queue's slots: a job wakes one slot of a worker that can run it, never every slot; nothing
polls at idle; a job no wake-up announced (committed by another process) is found by the sweep.

Real UpstreamWorkers (16 slots each) on a real SQLite store, the provider answered by an httpx MockTransport;
the store's ``queued`` (a slot's look) and ``claim`` are counted."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxserve.job import EventKind, Status
from fluxserve.jobs import JobService
from fluxserve.migrations import open_store
from fluxserve.queue import local
from fluxserve.queue.local import LocalDispatcher
from fluxserve.storage import LocalStorage
from fluxserve.upstream.worker import UpstreamWorker
from tests.unit.test_upstream_worker import _bfl, _job, _registry


class Counted:
    """Wraps a store method, recording each call's ``route`` keyword (or None)."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self.method = method
        self.calls: list[Any] = []
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.calls.append(kwargs.get("route"))
        return self.method(*args, **kwargs)


@pytest.fixture
def two_upstreams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[JobService, LocalDispatcher, Counted, Counted]]:
    # The lost-wake-up sweep (one look per worker every SWEEP_S) off, so the counts are the wake-ups' alone;
    # the test of the sweep turns it back on.
    monkeypatch.setattr(local, "SWEEP_S", 3600.0)
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    jobs = JobService(store, lease_s=5.0)
    storage = LocalStorage(tmp_path / "files", b"s" * 32, "http://127.0.0.1:8123", 3600)
    reg = _registry(tmp_path, "bfl", max_in_flight=16)
    jobs.registry = reg
    up = _bfl(polls_pending=0)
    workers = [
        UpstreamWorker(jobs, storage, reg, reg.upstreams[name], transport=up.transport) for name in ("up", "other")
    ]
    dispatcher = LocalDispatcher(jobs, workers)
    wakes = (EventKind.SUBMITTED, EventKind.REQUEUED)
    jobs.on_change(lambda job, kind: dispatcher.wake(job) if kind in wakes else None)
    looks, claims = Counted(jobs.store.queued), Counted(jobs.store.claim)
    jobs.store.queued, jobs.store.claim = looks, claims  # type: ignore[method-assign]
    dispatcher.start()
    _settled(looks)
    yield jobs, dispatcher, looks, claims
    dispatcher.stop()
    jobs.close()
    store.close()


def _settled(looks: Counted, quiet_s: float = 0.3, limit_s: float = 10.0) -> None:
    """Until no slot has looked for quiet_s (each slot looks once as it starts)."""
    deadline = time.monotonic() + limit_s
    seen = -1
    while len(looks.calls) != seen and time.monotonic() < deadline:
        seen = len(looks.calls)
        time.sleep(quiet_s)


def _done(jobs: JobService, job_id: str, limit_s: float = 10.0) -> Status:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        job = jobs.store.get_job(job_id)
        if job is not None and job.status.is_terminal:
            return job.status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not end within {limit_s} s")


def test_one_job_wakes_one_slot_of_the_upstream_it_is_routed_to(two_upstreams: Any) -> None:
    jobs, _, looks, claims = two_upstreams
    looks.calls.clear()
    claims.calls.clear()
    job = _job(jobs)
    assert _done(jobs, job.id) is Status.SUCCEEDED
    _settled(looks)
    # The woken slot claims the job its wake-up named, without a look at the queue (it was idle: nothing else
    # waited for it), runs it, then goes back to sleep without a look (nothing was announced meanwhile); the
    # other 31 slots never woke.
    assert looks.calls == [], looks.calls
    assert len(claims.calls) == 1


def test_nothing_polls_at_idle(two_upstreams: Any) -> None:
    _, _, looks, _ = two_upstreams
    looks.calls.clear()
    time.sleep(2.5)  # past two lease sweeps (every second); the lost-wake-up sweep is off here
    assert looks.calls == []


def test_several_jobs_at_once_each_wake_a_slot_and_all_run(two_upstreams: Any) -> None:
    jobs, _, looks, claims = two_upstreams
    looks.calls.clear()
    submitted = [_job(jobs) for _ in range(6)]
    assert all(_done(jobs, j.id) is Status.SUCCEEDED for j in submitted)
    assert set(looks.calls) <= {"up"}  # the other upstream's slots never looked
    assert len(claims.calls) <= 2 * len(submitted)  # a claim lost to a sibling slot is rare, never a stampede


def test_jobs_announced_while_every_slot_is_busy_are_run_by_the_next_to_finish(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    jobs = JobService(store, lease_s=5.0)
    storage = LocalStorage(tmp_path / "files", b"s" * 32, "http://127.0.0.1:8123", 3600)
    reg = _registry(tmp_path, "bfl", max_in_flight=1)
    jobs.registry = reg
    gate = threading.Event()
    up = _bfl(polls_pending=0)
    answer = up.routes[("POST", "/v1/flux-pro")]
    up.routes[("POST", "/v1/flux-pro")] = lambda request: (gate.wait(10), answer(request))[1]
    dispatcher = LocalDispatcher(
        jobs, [UpstreamWorker(jobs, storage, reg, reg.upstreams["up"], transport=up.transport)]
    )
    jobs.on_change(lambda job, kind: dispatcher.wake(job) if kind is EventKind.SUBMITTED else None)
    dispatcher.start()
    try:
        first = _job(jobs)  # holds the one slot until the gate opens
        deadline = time.monotonic() + 10
        while up.count("POST", "/v1/flux-pro") == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        behind = [_job(jobs) for _ in range(3)]  # announced while the slot is busy: no idle slot to wake
        gate.set()
        # Well before the lost-wake-up sweep (5 s): the slot looks again after each job it finishes.
        assert all(_done(jobs, j.id, limit_s=4.0) is Status.SUCCEEDED for j in [first, *behind])
    finally:
        gate.set()
        dispatcher.stop()
        jobs.close()
        store.close()


def test_a_job_no_wake_up_announced_is_found_by_the_sweep(two_upstreams: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = two_upstreams[0]
    monkeypatch.setattr(local, "SWEEP_S", 1.0)
    other = JobService(jobs.store, lease_s=5.0, registry=jobs.registry)  # another process: no wake-up here
    try:
        spec = jobs.registry.get("flux-pro").make_spec(prompt="a fox", width=256, height=256, seed=5)
        job = other.submit_sync("o", "openai", spec, {})
        assert _done(jobs, job.id, limit_s=8.0) is Status.SUCCEEDED
    finally:
        other.close()


def test_polls_come_near_the_typical_duration_then_back_off(tmp_path: Path) -> None:
    """A provider's task that takes 0.6 s, polled at a 0.01 s interval: the first task is polled with backoff
    (no fixed 0.02 s hammering), the next ones near when the first ended (issue 38: adaptive polling)."""
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    jobs = JobService(store, lease_s=5.0)
    storage = LocalStorage(tmp_path / "files", b"s" * 32, "http://127.0.0.1:8123", 3600)
    reg = _registry(tmp_path, "bfl")  # poll_interval_s = 0.01
    jobs.registry = reg
    up = _bfl(polls_pending=0)
    submitted: list[float] = []
    ready = up.routes[("GET", "/v1/get_result")]
    submit = up.routes[("POST", "/v1/flux-pro")]

    def post(request: Any) -> Any:
        submitted.append(time.monotonic())
        return submit(request)

    def poll(request: Any) -> Any:
        if time.monotonic() - submitted[-1] < 0.6:
            return httpx.Response(200, json={"id": "t1", "status": "Pending"})
        return ready(request)

    up.routes[("POST", "/v1/flux-pro")], up.routes[("GET", "/v1/get_result")] = post, poll
    worker = UpstreamWorker(jobs, storage, reg, reg.upstreams["up"], transport=up.transport)
    assert worker.load()
    worker.start_heartbeat()
    try:
        counts = []
        for _ in range(3):
            before = up.count("GET", "/v1/get_result")
            job = _job(jobs)
            assert worker.run_claimed(job.id) and _done(jobs, job.id) is Status.SUCCEEDED
            counts.append(up.count("GET", "/v1/get_result") - before)
        assert counts[0] <= 12  # a fixed 0.01 s interval would have polled about 60 times
        assert all(c <= 4 for c in counts[1:]), counts  # now, then near 0.48 s, then a few short waits
        typical = worker.pacing.typical_s("flux-pro")
        assert typical is not None and 0.6 <= typical < 1.5
    finally:
        worker.stop()
        jobs.close()
        store.close()


def test_a_wake_up_whose_job_was_taken_meanwhile_falls_back_to_the_queue(tmp_path: Path) -> None:
    """A woken slot claims the job its wake-up named without a look; where that job is gone (another node took
    it), the slot reads the queue in the fair order and runs what waits there."""
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    jobs = JobService(store, lease_s=5.0)
    storage = LocalStorage(tmp_path / "files", b"s" * 32, "http://127.0.0.1:8123", 3600)
    reg = _registry(tmp_path, "bfl")
    jobs.registry = reg
    worker = UpstreamWorker(jobs, storage, reg, reg.upstreams["up"], transport=_bfl(polls_pending=0).transport)
    assert worker.load()
    worker.start_heartbeat()
    dispatcher = LocalDispatcher(jobs, [worker])
    looks = Counted(jobs.store.queued)
    jobs.store.queued = looks  # type: ignore[method-assign]
    try:
        taken, waiting = _job(jobs), _job(jobs)
        assert jobs.claim_id(taken.id, "another-node") is not None
        event = threading.Event()
        dispatcher._hints[event] = taken.id
        assert dispatcher._run_next(worker, event)
        assert looks.calls == ["up"]
        assert _done(jobs, waiting.id) is Status.SUCCEEDED
        gone = jobs.store.get_job(taken.id)
        assert gone is not None and gone.status is Status.PROCESSING and gone.worker_id == "another-node"
        assert event not in dispatcher._hints
    finally:
        worker.stop()
        jobs.close()
        store.close()
