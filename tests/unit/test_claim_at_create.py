"""A create that an idle slot of this process can run is written claimed by that slot's worker, in the create's
own transaction (issue 38: one transaction fewer on a relayed image's way, no claim race), and handed to it.

Real UpstreamWorkers on a real SQLite store through the embedded queue's own wiring (LocalQueue.dispatcher);
the provider is an httpx MockTransport whose submit can be held on a gate (the one slot busy)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fluxserve.job import EventKind, Job, Status
from fluxserve.jobs import JobService
from fluxserve.migrations import open_store
from fluxserve.queue import local
from fluxserve.queue.local import LocalDispatcher, LocalQueue
from fluxserve.storage import LocalStorage
from fluxserve.upstream.worker import UpstreamWorker
from tests.unit.test_local_queue import Counted, _done, _settled
from tests.unit.test_upstream_worker import Upstream, _bfl, _job, _registry


class Setup:
    def __init__(self, tmp_path: Path, slots: int) -> None:
        self.store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
        self.jobs = JobService(self.store, lease_s=5.0)
        storage = LocalStorage(tmp_path / "files", b"s" * 32, "http://127.0.0.1:8123", 3600)
        reg = _registry(tmp_path, "bfl", max_in_flight=slots)
        self.jobs.registry = reg
        self.gate = threading.Event()
        self.gate.set()
        self.up: Upstream = _bfl(polls_pending=0)
        answer = self.up.routes[("POST", "/v1/flux-pro")]
        self.up.routes[("POST", "/v1/flux-pro")] = lambda request: (self.gate.wait(10), answer(request))[1]
        self.worker = UpstreamWorker(self.jobs, storage, reg, reg.upstreams["up"], transport=self.up.transport)
        self.dispatcher: LocalDispatcher = LocalQueue(self.jobs).dispatcher([self.worker])
        wakes = (EventKind.SUBMITTED, EventKind.REQUEUED)
        self.jobs.on_change(lambda job, kind: self.dispatcher.wake(job) if kind in wakes else None)  # as app.py
        self.looks, self.claims = Counted(self.jobs.store.queued), Counted(self.jobs.store.claim)
        self.jobs.store.queued, self.jobs.store.claim = self.looks, self.claims  # type: ignore[method-assign]

    def start(self) -> None:
        self.dispatcher.start()
        deadline = time.monotonic() + 10
        while self.worker.state != "ready" or not self.dispatcher.free_worker(self.probe()):
            assert time.monotonic() < deadline, "the slots did not go idle"
            time.sleep(0.02)
        _settled(self.looks)  # each slot looks once as it starts
        self.looks.calls.clear()
        self.claims.calls.clear()

    def probe(self) -> Job:
        assert self.jobs.registry is not None
        spec = self.jobs.registry.get("flux-pro").make_spec(prompt="a fox", width=256, height=256, seed=5)
        return Job(id="probe", owner="o", dialect="openai", spec=spec, request={}, route="up")

    def busy(self) -> Job:
        """A job that holds the one slot until the gate opens (its submit waits on it)."""
        self.gate.clear()
        first = _job(self.jobs)
        deadline = time.monotonic() + 10
        while self.up.count("POST", "/v1/flux-pro") == 0:
            assert time.monotonic() < deadline, "the first job's submit never came"
            time.sleep(0.02)
        return first

    def close(self) -> None:
        self.gate.set()
        self.dispatcher.stop()
        self.jobs.close()
        self.store.close()


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    monkeypatch.setattr(local, "SWEEP_S", 3600.0)  # the counts are the wake-ups' alone
    made: list[Setup] = []

    def make(slots: int) -> Setup:
        made.append(Setup(tmp_path, slots))
        made[-1].start()
        return made[-1]

    yield make  # type: ignore[misc]
    for s in made:
        s.close()


def test_a_create_with_an_idle_slot_is_written_claimed_and_run_without_a_claim_or_a_look(setup: Any) -> None:
    s: Setup = setup(4)
    reads = Counted(s.jobs.store.events)
    s.jobs.store.events = reads  # type: ignore[method-assign]
    created = s.jobs.submit_sync("o", "openai", s.probe().spec, {})
    assert created.status is Status.QUEUED  # the answer shows it as it was an instant before its claim
    assert _done(s.jobs, created.id) is Status.SUCCEEDED
    assert s.claims.calls == [] and s.looks.calls == []  # no claim transaction, no read of the queue
    assert reads.calls == []  # its first claim: no earlier attempt's upstream task to look for
    events = s.jobs.events(created.id)
    kinds = [e.kind for e in events]
    assert kinds[:2] == [EventKind.SUBMITTED, EventKind.STARTED] and kinds[-1] is EventKind.SUCCEEDED
    assert [e.attempt for e in events[:2]] == [0, 1]
    assert events[1].payload == {"worker": s.worker.worker_id}
    done = s.jobs.store.get_job(created.id)
    assert done is not None and done.attempts == 1 and done.worker_id == s.worker.worker_id
    assert done.started_at is not None and done.started_at >= done.created_at
    assert s.up.count("POST", "/v1/flux-pro") == 1


def test_a_create_finds_no_idle_slot_then_it_is_queued_and_claimed_as_before(setup: Any) -> None:
    s: Setup = setup(1)
    first = s.busy()
    second = _job(s.jobs)
    row = s.jobs.store.get_job(second.id)
    assert row is not None and row.status is Status.QUEUED and row.attempts == 0  # the slot was busy
    s.gate.set()
    assert _done(s.jobs, first.id) is Status.SUCCEEDED and _done(s.jobs, second.id) is Status.SUCCEEDED
    assert len(s.claims.calls) == 1  # the second's own claim; the first was claimed by its create


def test_a_job_handed_over_after_its_slot_was_taken_runs_when_that_slot_is_free(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slot seen idle at the create was taken before the hand-over (a concurrent create): the claimed job
    waits for the worker's next free slot, not for the lease sweep, and is never claimed twice."""
    s: Setup = setup(1)
    first = s.busy()
    monkeypatch.setattr(s.dispatcher, "free_worker", lambda job: s.worker.worker_id)  # as if seen idle
    second = _job(s.jobs)
    row = s.jobs.store.get_job(second.id)
    assert row is not None and row.status is Status.PROCESSING and row.attempts == 1
    time.sleep(0.2)
    assert s.up.count("POST", "/v1/flux-pro") == 1  # it waits: the one slot is still busy
    s.gate.set()
    assert _done(s.jobs, first.id, limit_s=4.0) is Status.SUCCEEDED
    assert _done(s.jobs, second.id, limit_s=4.0) is Status.SUCCEEDED  # well before a lease or sweep
    assert s.claims.calls == []
    assert s.up.count("POST", "/v1/flux-pro") == 2


def test_a_stop_gives_back_a_claimed_job_that_no_slot_started(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s: Setup = setup(1)
    first = s.busy()
    monkeypatch.setattr(s.dispatcher, "free_worker", lambda job: s.worker.worker_id)
    second = _job(s.jobs)
    threading.Timer(0.3, s.gate.set).start()  # the first's submit returns during the stop
    s.dispatcher.stop()
    held = s.jobs.store.get_job(first.id)  # a stopping upstream worker gives its running job back too
    assert held is not None and held.status in (Status.QUEUED, Status.SUCCEEDED), held
    back = s.jobs.store.get_job(second.id)
    assert back is not None and back.status is Status.QUEUED, back
    assert back.attempts == 0 and back.worker_id is None  # its attempt given back: it never ran
    assert [e.kind for e in s.jobs.events(second.id)][-1] is EventKind.REQUEUED
    assert s.up.count("POST", "/v1/flux-pro") == 1


def test_no_worker_takes_a_job_at_its_create_when_it_cannot_run_it_now(setup: Any) -> None:
    s: Setup = setup(2)
    job = s.probe()
    assert s.dispatcher.free_worker(job) == s.worker.worker_id
    assert s.jobs.registry is not None
    kontext = s.jobs.registry.get("flux-kontext-pro").make_spec(prompt="x", width=256, height=256)
    assert s.dispatcher.free_worker(replace(job, spec=kontext)) == s.worker.worker_id  # the same upstream's
    assert s.dispatcher.free_worker(replace(job, route="other")) is None  # no worker of that route here
    assert s.dispatcher.free_worker(replace(job, route=None)) is None  # a device's job
    s.worker.state = "error"
    assert s.dispatcher.free_worker(job) is None
