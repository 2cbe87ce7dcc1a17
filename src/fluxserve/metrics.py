"""GET /metrics in Prometheus text format (prometheus-client), one registry per app.

Job, output and webhook figures are read from the database at scrape time, so every node reports
the same totals however many API nodes and workers share it (no per-process counters as truth).
HTTP requests and the worker state are this process's own, labelled as such by the scrape target.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
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


class EngineCollector(Collector):
    """This process's engines: device memory against the budget, and each name's state."""

    def __init__(self, engines: Callable[[], list[dict[str, Any]]]) -> None:
        self._engines = engines  # each local device worker's engine_info()

    def collect(self) -> Iterator[Metric]:
        used = GaugeMetricFamily(
            "fluxserve_memory_used_bytes", "Device memory the loaded pipelines take.", labels=["device"]
        )
        budget = GaugeMetricFamily("fluxserve_memory_budget_bytes", "The device memory budget.", labels=["device"])
        state = GaugeMetricFamily(
            "fluxserve_model_state",
            "1 for each model's current state on a device.",
            labels=["model", "device", "state"],
        )
        for info in self._engines():
            memory, device = info.get("memory"), str(info.get("device", ""))
            if not isinstance(memory, dict):
                continue  # not loaded yet, or an engine without a ledger
            used.add_metric([device], memory["used_bytes"])
            budget.add_metric([device], memory["budget_bytes"])
            for name, view in info.get("models", {}).items():
                for s in MODEL_STATES:
                    state.add_metric([name, device, s], 1.0 if view["state"] == s else 0.0)
        yield from (used, budget, state)


MODEL_STATES = ("unloaded", "loading", "ready")


class CountsCollector(Collector):
    """A counter this process keeps as a plain mapping of label values to counts (provenance, safety)."""

    def __init__(self, name: str, text: str, labels: list[str], counts: Callable[[], Mapping[Any, int]]) -> None:
        self._name, self._text, self._labels, self._counts = name, text, labels, counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._text, labels=self._labels)
        for values, n in sorted(self._counts().items()):
            family.add_metric(list(values), n)
        yield family


class Metrics:
    """The app's registry, its HTTP request counter and the scrape."""

    def __init__(
        self,
        store: Store,
        worker_state: Callable[[], str],
        token: str | None,
        upstreams: Callable[[], list[Any]] | None = None,
        engines: Callable[[], list[dict[str, Any]]] = list,
        provenance: Callable[[], Mapping[Any, int]] = dict,
        safety: Callable[[], Mapping[Any, int]] = dict,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoreCollector(store, worker_state, upstreams))
        self.registry.register(EngineCollector(engines))
        self.registry.register(
            CountsCollector(
                "fluxserve_provenance",
                "Provenance operations by outcome: watermark and sign (ok, failed), check (detected, not_detected).",
                ["operation", "outcome"],
                provenance,
            )
        )
        self.registry.register(
            CountsCollector(
                "fluxserve_safety_checks",
                "Local outputs the safety classifier flagged (withheld), passed, or skipped (tolerance 6).",
                ["outcome"],
                safety,
            )
        )
        self.model_loads = Counter(
            "fluxserve_model_loads", "Pipelines loaded or warmed back onto a device.", ["model"], registry=self.registry
        )
        self.model_evictions = Counter(
            "fluxserve_model_evictions", "Pipelines moved off a device to make room.", ["model"], registry=self.registry
        )
        self.model_load_seconds = Histogram(
            "fluxserve_model_load_seconds",
            "Seconds to load a pipeline (from disk or the host tier).",
            registry=self.registry,
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.requests = Counter(
            "fluxserve_http_requests",
            "HTTP requests by route and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self._token = token

    def check_access(self, client_host: str | None, authorization: str | None) -> None:
        """Open on loopback; elsewhere only with the operator's metrics token (FLUXSERVE_METRICS_TOKEN)."""
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

    def model_loaded(self, model: str, seconds: float) -> None:
        self.model_loads.labels(model).inc()
        self.model_load_seconds.observe(seconds)

    def model_evicted(self, model: str) -> None:
        self.model_evictions.labels(model).inc()

    def count_request(self, route: str, method: str, status: int) -> None:
        self.requests.labels(route, method, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
