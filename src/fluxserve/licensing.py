"""Reporting generations to BFL under its self-hosted commercial licence: ``POST {base}/v1/licenses/models/
{slug}/usage`` with ``{"number_of_generations": n}`` and ``x-key``, from the durable counts a job's success
writes (store/licences.py).

Each node runs a reporter thread; batches are claimed in the database, so nodes never send the same counts
twice. A count committed and not yet sent when a process dies (kill -9) is sent by the next reporter. A batch
whose request went out but whose answer never came back (the sender died, or the connection dropped) is sent
again after its lease under the same id, as ``Idempotency-Key``: counted once where BFL honours the key; where
it does not, that one batch could be counted twice, which `fluxserve usage --licensing` shows."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import httpx

from .models.licensing import BflLicensing
from .netguard import tls
from .store import Store, UsageBatch

log = logging.getLogger(__name__)


class LicenceReporter:
    def __init__(self, store: Store, config: BflLicensing, *, transport: Any = None) -> None:
        self._store, self.config = store, config
        self._client = httpx.Client(timeout=httpx.Timeout(30.0, connect=10.0), transport=transport, verify=tls())
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fluxserve-licensing", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(10)
        self._client.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.send_due()
            except Exception:  # the database or anything else: logged, tried again at the next interval
                log.exception("licence usage: reporting failed; trying again in %.0f s", self.config.interval_s)
            self._wake.wait(self.config.interval_s)
            self._wake.clear()

    def send_due(self) -> int:
        """Send every batch that is due now; the number acknowledged."""
        sent = 0
        tried: set[str] = set()
        while not self._stopping.is_set():
            batch = self._store.claim_usage(time.time(), self.config.lease_s)
            if batch is None or batch.id in tried:  # nothing left, or a batch that just failed: next interval
                return sent
            tried.add(batch.id)
            if self._send(batch):
                self._store.usage_sent(batch.id, time.time())
                sent += 1
        return sent

    def _send(self, batch: UsageBatch) -> bool:
        key = os.environ.get(self.config.key_env)
        if not key:
            self._store.usage_failed(batch.id, f"{self.config.key_env} is not set")
            log.error("licence usage: %s is not set; %d generations wait", self.config.key_env, batch.generations)
            return False
        try:
            resp = self._client.post(
                self.config.url(batch.slug),
                json={"number_of_generations": batch.generations},
                headers={"x-key": key, "Idempotency-Key": batch.id},
            )
        except httpx.HTTPError as exc:
            self._store.usage_failed(batch.id, f"{type(exc).__name__}: {exc}")
            log.warning("licence usage: %s unreachable (%s); will retry", self.config.base_url, exc)
            return False
        if resp.is_success:
            log.info("licence usage: reported %d generations of %s", batch.generations, batch.slug)
            return True
        self._store.usage_failed(batch.id, f"HTTP {resp.status_code}: {resp.text[:300]}")
        log.warning("licence usage: BFL answered %d for %s; will retry", resp.status_code, batch.slug)
        return False
