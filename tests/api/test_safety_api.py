"""The optional output safety check (issue 37): a classifier from a local folder runs on each local output; a
flagged image fails its job in each dialect's own words (BFL `Content Moderated`, OpenAI `moderation_blocked`,
Replicate failed with a message), is never stored and is counted; the flags that relax it (BFL
`safety_tolerance`, OpenAI `moderation`, Replicate `disable_safety_checker`) count only within the operator's
`safety_max_tolerance`; with no classifier the flags are accepted and nothing is filtered."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.engine.safety import SafetyChecker
from fluxserve.settings import Settings
from tests.conftest import AUTH
from tests.support.fakes import FakeEngine
from tests.support.safety_util import build_classifier

XKEY = {"x-key": AUTH["Authorization"].removeprefix("Bearer ")}
SCHNELL = "/v1/models/black-forest-labs/flux-schnell/predictions"


@pytest.fixture(scope="module")
def unsafe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_classifier(tmp_path_factory.mktemp("safety") / "nsfw-0.9", 0.9)


@pytest.fixture(scope="module")
def borderline_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_classifier(tmp_path_factory.mktemp("safety") / "nsfw-0.3", 0.3)


def _replicate(client: TestClient, **inp: Any) -> dict[str, Any]:
    body = {"input": {"prompt": "p", **inp}}
    return dict(client.post(SCHNELL, json=body, headers={**AUTH, "Prefer": "wait=30"}).json())


def _bfl(client: TestClient, **body: Any) -> dict[str, Any]:
    task = client.post("/v1/flux-dev", json={"prompt": "p", "width": 256, "height": 256, **body}, headers=XKEY)
    assert task.status_code == 200, task.text
    for _ in range(300):
        result = dict(client.get(f"/v1/get_result?id={task.json()['id']}", headers=XKEY).json())
        if result["status"] not in ("Pending", "Reasoning"):
            return result
        time.sleep(0.02)
    raise AssertionError("the BFL task did not end")


def _openai(client: TestClient, **body: Any) -> Any:
    req = {"model": "flux-schnell", "prompt": "p", "size": "256x256", "response_format": "b64_json", **body}
    return client.post("/v1/images/generations", json=req, headers=AUTH)


def test_a_flagged_image_fails_in_each_dialects_words_and_is_never_stored(
    settings: Settings, unsafe_model: Path
) -> None:
    settings.safety_model = unsafe_model
    with TestClient(create_app(settings, engine=FakeEngine()), client=("127.0.0.1", 1)) as client:
        job = _replicate(client)
        assert job["status"] == "failed" and job["error"].startswith("NSFW content detected")
        assert "score 0.90, threshold 0.50" in job["error"]
        bfl = _bfl(client)
        assert bfl["status"] == "Content Moderated" and "NSFW" in bfl["result"]["error"]
        resp = _openai(client)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "moderation_blocked"
        # The flags that would relax it are capped by the operator's bound (2 by default): still withheld.
        assert _replicate(client, disable_safety_checker=True)["status"] == "failed"
        assert _bfl(client, safety_tolerance=6)["status"] == "Content Moderated"
        metrics = client.get("/metrics").text
        assert 'fluxserve_safety_checks_total{outcome="flagged"} 5.0' in metrics
    assert not list(settings.outputs_dir.glob("*/out-*"))  # nothing withheld was stored


def test_relaxing_flags_count_within_the_operators_bound(settings: Settings, unsafe_model: Path) -> None:
    settings.safety_model, settings.safety_max_tolerance = unsafe_model, 6
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        assert _replicate(client, disable_safety_checker=True)["status"] == "succeeded"
        assert _bfl(client, safety_tolerance=6)["status"] == "Ready"
        assert _bfl(client, safety_tolerance=5)["status"] == "Content Moderated"  # threshold 0.875 < 0.9
        # moderation=low: tolerance 4, threshold 0.75: 0.9 is still withheld
        assert _openai(client, moderation="low").json()["error"]["code"] == "moderation_blocked"


def test_a_stricter_tolerance_lowers_the_threshold(settings: Settings, borderline_model: Path) -> None:
    settings.safety_model = borderline_model
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        assert _bfl(client)["status"] == "Ready"  # 0.3 under 0.5
        assert _bfl(client, safety_tolerance=0)["status"] == "Content Moderated"  # threshold 0.5 / 3
        assert _openai(client).status_code == 200


def test_without_a_classifier_the_flags_are_accepted_and_nothing_is_filtered(client: TestClient) -> None:
    assert _replicate(client, disable_safety_checker=True)["status"] == "succeeded"
    assert _bfl(client, safety_tolerance=0)["status"] == "Ready"
    assert _openai(client, moderation="low").status_code == 200


def test_thresholds_and_bad_configurations(tmp_path: Path, unsafe_model: Path) -> None:
    checker = SafetyChecker(unsafe_model, threshold=0.5, labels=["nsfw"], max_tolerance=6)
    assert [checker.threshold_for(t) for t in range(7)] == [0.5 / 3, 1 / 3, 0.5, 0.625, 0.75, 0.875, None]
    capped = SafetyChecker(unsafe_model, threshold=0.5, labels=["nsfw"], max_tolerance=2)
    assert capped.threshold_for(6) == 0.5
    with pytest.raises(ValueError, match="not a model folder"):
        SafetyChecker(tmp_path, threshold=0.5, labels=["nsfw"], max_tolerance=2)
    wrong = SafetyChecker(unsafe_model, threshold=0.5, labels=["porn"], max_tolerance=2)
    with pytest.raises(ValueError, match="none of its labels"):
        wrong.scores([])
