"""GET /metrics: Prometheus text from the shared database and this process; loopback or token only."""

from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fluxserve.app import create_app
from fluxserve.settings import Settings
from tests.conftest import AUTH
from tests.support.fakes import FakeEngine
from tests.support.polling import wait_for


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_jobs_images_and_requests_across_nodes(settings: Settings) -> None:
    loopback = ("127.0.0.1", 50000)
    with (
        TestClient(create_app(settings, engine=FakeEngine()), client=loopback) as node_a,
        TestClient(create_app(settings, engine=FakeEngine()), client=loopback) as node_b,
    ):
        for n in (1, 3):
            resp = node_a.post("/v1/images/generations", json={"prompt": "p", "size": "256x512", "n": n}, headers=AUTH)
            assert resp.status_code == 200
        assert node_a.post("/v1/images/generations", json={"prompt": ""}, headers=AUTH).status_code == 400
        # Node B never served a request, yet reports the jobs node A ran: the figures come from the database.
        text = node_b.get("/metrics").text
        got = _samples(text)
        assert got[("fluxserve_jobs", (("model", "flux"), ("status", "succeeded")))] == 2
        assert got[("fluxserve_images_generated_total", (("model", "flux"),))] == 4
        assert abs(got[("fluxserve_megapixels_generated_total", (("model", "flux"),))] - 4 * 256 * 512 / 1e6) < 1e-9
        assert got[("fluxserve_jobs_timed_total", ())] == 2
        assert got[("fluxserve_job_stage_seconds_total", (("stage", "running"),))] > 0
        assert got[("fluxserve_job_stage_seconds_total", (("stage", "encoding"),))] > 0  # PNGs were written
        assert got[("fluxserve_worker_state", (("state", "ready"),))] == 1
        # HTTP requests are per process, by route template and status.
        counted = _samples(node_a.get("/metrics").text)
        route = (("method", "POST"), ("route", "/v1/images/generations"))
        assert counted[("fluxserve_http_requests_total", (*route, ("status", "200")))] == 2
        assert counted[("fluxserve_http_requests_total", (*route, ("status", "400")))] == 1
        assert ("fluxserve_http_requests_total", (*route, ("status", "200"))) not in got


def test_queue_depth_per_model(settings: Settings) -> None:
    engine = FakeEngine(step_s=0.3)
    with TestClient(create_app(settings, engine=engine), client=("::1", 1)) as client:
        for _ in range(3):
            assert client.post("/v1/flux-dev", json={"prompt": "q", "steps": 10}, headers=AUTH).status_code == 200
        wait_for(lambda: engine.started.is_set(), bool, timeout=5)
        got = _samples(client.get("/metrics").text)
        assert got[("fluxserve_queue_depth", (("model", "flux-dev"),))] == 2


def test_metrics_need_loopback_or_the_token(settings: Settings, tmp_path: Path) -> None:
    remote = ("203.0.113.7", 40000)
    with TestClient(create_app(settings, engine=FakeEngine()), client=remote) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 403 and "loopback" in refused.json()["error"]["message"]
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403
        # Without FLUXSERVE_METRICS_TOKEN, loopback only: the API key is no scrape token.
        assert client.get("/metrics", headers=AUTH).status_code == 403
    token = settings.model_copy(update={"metrics_token": "scrape-me", "data_dir": tmp_path / "other"})
    with TestClient(create_app(token, engine=FakeEngine()), client=remote) as client:
        assert client.get("/metrics", headers=AUTH).status_code == 403
        ok = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")


def test_usage_per_key_model_and_day(settings: Settings) -> None:
    from fluxserve.auth import create_key
    from fluxserve.migrations import open_store
    from fluxserve.usage import usage

    store = open_store(settings.database)
    other = create_key(store, "team-b")
    store.close()
    other_auth = {"Authorization": f"Bearer {other.key}"}
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        for n in (2, 1):
            body = {"prompt": "u", "size": "512x512", "n": n}
            assert client.post("/v1/images/generations", json=body, headers=AUTH).status_code == 200
        assert (
            client.post(
                "/v1/images/generations", json={"prompt": "u", "model": "flux-schnell"}, headers=other_auth
            ).status_code
            == 200
        )
        mine = client.get("/v1/usage", headers=AUTH).json()
        assert [(r["model"], r["jobs"], r["images"]) for r in mine["data"]] == [("flux", 2, 3)]
        assert mine["data"][0]["megapixels"] == round(3 * 512 * 512 / 1e6, 3) and mine["data"][0]["worker_seconds"] > 0
        assert [r["model"] for r in client.get("/v1/usage", headers=other_auth).json()["data"]] == ["flux-schnell"]
        bad = client.get("/v1/usage", params={"since": "yesterday"}, headers=AUTH)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
        assert client.get("/v1/usage", params={"since": "2999-01-01"}, headers=AUTH).json()["data"] == []
        store = client.app.state.services.store  # type: ignore[attr-defined]
        rows = {(r.key, r.model): r for r in usage(store, 0)}
        assert set(rows) == {("FLUXSERVE_API_KEY", "flux"), ("team-b", "flux-schnell")}


def test_the_grafana_dashboard_reads_only_metrics_the_server_exports(settings: Settings) -> None:
    """deploy/grafana's dashboard: every series a panel queries is one /metrics serves (a renamed metric
    would leave a panel empty without anyone noticing)."""
    import json
    import re

    dashboard = json.loads(
        (Path(__file__).resolve().parents[2] / "deploy/grafana/fluxserve-dashboard.json").read_text()
    )
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(fluxserve_[a-z_]+)\b", target["expr"])
    }
    with TestClient(create_app(settings, engine=FakeEngine()), client=("127.0.0.1", 50000)) as client:
        assert (
            client.post("/v1/images/generations", json={"prompt": "p", "size": "256x256"}, headers=AUTH).status_code
            == 200
        )
        exported = {
            s.name for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples
        }
        families = {family.name for family in text_string_to_metric_families(client.get("/metrics").text)}
    # Families without a sample yet (no upstream, no memory budget here) are declared in metrics.py.
    declared = set(
        re.findall(
            r'"(fluxserve_[a-z_]+)"', (Path(__file__).resolve().parents[2] / "src/fluxserve/metrics.py").read_text()
        )
    )
    suffixed = {n for n in queried if n.endswith(("_total", "_bucket", "_sum", "_count"))}
    assert len(queried) >= 12
    for name in queried:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name) if name in suffixed else name
        assert name in exported or base in families or base in declared, name
