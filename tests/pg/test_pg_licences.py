"""The licence usage outbox on PostgreSQL with several nodes claiming at once (issue 37): every count goes
into exactly one batch, and a batch whose lease ran out is taken over by one node only."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from fluxserve.migrations import open_store
from fluxserve.store import Store, UsageBatch, record_usage


def _claims(store: Store, lease_s: float) -> list[UsageBatch]:
    """What one node claims until nothing is left (or, as the reporter, until a batch it had comes again)."""
    got: list[UsageBatch] = []
    while (batch := store.claim_usage(time.time(), lease_s, limit=7)) is not None and batch.id not in {
        b.id for b in got
    }:
        got.append(batch)
    return got


def test_nodes_claiming_at_once_put_each_count_in_one_batch(pg_url: str) -> None:
    nodes = [open_store(pg_url) for _ in range(3)]
    try:
        with nodes[0]._write() as conn:
            for i in range(120):
                record_usage(conn, f"job{i}", "flux-1-dev" if i % 3 else "flux-tools", 1 + i % 2, time.time())
            record_usage(conn, "job0", "flux-1-dev", 5, time.time())  # the same job again: not counted twice
        with ThreadPoolExecutor(6) as pool:
            batches = [b for got in pool.map(_claims, [*nodes, *nodes], [60.0] * 6) for b in got]
        assert len({b.id for b in batches}) == len(batches)
        assert sum(b.jobs for b in batches) == 120
        assert sum(b.generations for b in batches) == sum(1 + i % 2 for i in range(120))
        assert all(b.jobs <= 7 for b in batches)

        time.sleep(1.2)  # every batch's lease (1 s) ran out, none was acknowledged: each is taken over once
        with ThreadPoolExecutor(6) as pool:
            again = [b for got in pool.map(_claims, [*nodes, *nodes], [1.0] * 6) for b in got]
        assert sorted(b.id for b in again) == sorted(b.id for b in batches)
        for b in batches:
            nodes[0].usage_sent(b.id, time.time())
        assert nodes[1].claim_usage(time.time() + 100, 1.0) is None
        report = nodes[2].usage_report()
        assert sum(int(r["reported"]) for r in report) == sum(1 + i % 2 for i in range(120))  # type: ignore[call-overload]
    finally:
        for node in nodes:
            node.close()
