"""GET /metrics in Prometheus text format (prometheus-client), one registry per app.

Job, output and webhook figures are read from the database at scrape time, so every node reports
the same totals however many API nodes and workers share it (no per-process counters as truth).
HTTP requests and the worker state are this process's own, labelled as such by the scrape target.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import Forbidden
from .job import Status
from .store import Store

WORKER_STATES = ("loading", "ready", "error", "stopped")


class StoreCollector(Collector):
    def __init__(
        self, store: Store, worker_state: Callable[[], str], upstreams: Callable[[], list[Any]] | None = None
    ) -> None:
        self._store = store
        self._worker_state = worker_state
        self._upstreams = upstreams or list  # this process's upstream.worker.UpstreamWorker

    def collect(self) -> Iterator[Metric]:
        data = self._store.metrics()
        queued = GaugeMetricFamily("fluxserve_queue_depth", "Jobs waiting for a worker, per model.", labels=["model"])
        jobs = GaugeMetricFamily(
            "fluxserve_jobs",
            "Jobs in the database by model and status (ended ones until retention).",
            labels=["model", "status"],
        )
        for model, status, n in data["jobs"]:
            jobs.add_metric([model, status], n)
            if status == Status.QUEUED.value:
                queued.add_metric([model], n)
        images = CounterMetricFamily("fluxserve_images_generated", "Images of succeeded jobs.", labels=["model"])
        mp = CounterMetricFamily("fluxserve_megapixels_generated", "Megapixels of succeeded jobs.", labels=["model"])
        for model, n_images, megapixels in data["output"]:
            images.add_metric([model], n_images or 0)
            mp.add_metric([model], megapixels or 0.0)
        stage = CounterMetricFamily(
            "fluxserve_job_stage_seconds",
            "Seconds ended jobs spent queued, running (encoding aside) and encoding.",
            labels=["stage"],
        )
        ended = CounterMetricFamily("fluxserve_jobs_timed", "Ended jobs counted in fluxserve_job_stage_seconds.")
        for queued_s, running_s, encoding_s, n in data["stages"]:
            stage.add_metric(["queued"], queued_s or 0.0)
            stage.add_metric(["running"], running_s or 0.0)
            stage.add_metric(["encoding"], encoding_s or 0.0)
            ended.add_metric([], n)
        hooks = GaugeMetricFamily("fluxserve_webhook_deliveries", "Webhook deliveries by state.", labels=["state"])
        for state, n in data["webhooks"]:
            hooks.add_metric([state], n)
        worker = GaugeMetricFamily("fluxserve_worker_state", "This process's workers' state.", labels=["state"])
        current = self._worker_state()
        for state in WORKER_STATES:
            worker.add_metric([state], 1.0 if state == current else 0.0)
        yield from (queued, jobs, images, mp, stage, ended, hooks, worker)
        yield from self._upstream_metrics()

    def _upstream_metrics(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(
            "fluxserve_upstream_healthy",
            "1 while an upstream provider is usable, 0 in its cool-down.",
            labels=["upstream"],
        )
        in_flight = GaugeMetricFamily(
            "fluxserve_upstream_in_flight", "Jobs this process holds on an upstream provider.", labels=["upstream"]
        )
        failures = GaugeMetricFamily(
            "fluxserve_upstream_consecutive_failures", "Failed calls since the last success.", labels=["upstream"]
        )
        for w in self._upstreams():
            view = w.engine_info()["upstream"]
            healthy.add_metric([view["name"]], 1.0 if view["healthy"] else 0.0)
            in_flight.add_metric([view["name"]], view["in_flight"])
            failures.add_metric([view["name"]], view["consecutive_failures"])
        yield from (healthy, in_flight, failures)


class Metrics:
    """The app's registry, its HTTP request counter and the scrape."""

    def __init__(
        self,
        store: Store,
        worker_state: Callable[[], str],
        token: str | None,
        upstreams: Callable[[], list[Any]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoreCollector(store, worker_state, upstreams))
        self.requests = Counter(
            "fluxserve_http_requests",
            "HTTP requests by route and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self._token = token

    def check_access(self, client_host: str | None, authorization: str | None) -> None:
        """Open on loopback; elsewhere only with the operator's metrics token (or the operator API key)."""
        if client_host is not None and _is_loopback(client_host):
            return
        presented = (authorization or "").partition(" ")[2].strip()
        # As bytes: compare_digest refuses a str with non-ASCII characters, and a header may carry them.
        if self._token and presented and secrets.compare_digest(presented.encode(), self._token.encode()):
            return
        raise Forbidden(
            "/metrics is open on loopback only; elsewhere send 'Authorization: Bearer <FLUXSERVE_METRICS_TOKEN>'.",
            code="metrics_forbidden",
        )

    def count_request(self, route: str, method: str, status: int) -> None:
        self.requests.labels(route, method, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
