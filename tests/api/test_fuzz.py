"""Property test: whatever JSON a client sends to a create route, the answer is never a 5xx."""

import base64
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import API_KEY, AUTH

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

# Field names each route knows, so examples reach deep validation rather than failing on the first key.
FIELDS = [
    "prompt",
    "model",
    "n",
    "size",
    "seed",
    "steps",
    "guidance",
    "response_format",
    "output_format",
    "output_compression",
    "quality",
    "num_outputs",
    "aspect_ratio",
    "output_quality",
    "num_inference_steps",
    "megapixels",
    "image",
    "input_image",
    "prompt_strength",
    "width",
    "height",
    "webhook",
    "version",
    "webhook_url",
    "safety_tolerance",
    "stream",
    "partial_images",
]
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)

ROUTES = [
    ("/v1/images/generations", lambda b: b),
    ("/vmodel/generate", lambda b: {"model": b.get("model", "flux-schnell"), "input": b}),
    ("/v1/models/black-forest-labs/flux-dev/predictions", lambda b: {"input": b}),
    ("/v1/predictions", lambda b: {"version": b.get("version", "black-forest-labs/flux-schnell"), "input": b}),
    ("/v1/flux-dev", lambda b: b),
    ("/v1/flux-kontext-pro", lambda b: b),
]


@pytest.mark.parametrize(("path", "shape"), ROUTES, ids=[r[0] for r in ROUTES])
def test_no_input_makes_a_server_error(client: TestClient, path: str, shape: Any) -> None:
    headers = {**AUTH, "x-key": API_KEY}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def check(body: dict[str, Any]) -> None:
        resp = client.post(path, json=shape(body), headers=headers)
        assert resp.status_code < 500, (body, resp.text)
        assert resp.headers["content-type"].startswith(
            ("application/json", "application/problem+json", "text/event-stream")
        )

    check()


# Header values a client can send: printable latin-1, as HTTP allows.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
durations = st.builds(
    lambda n, u: f"{n}{u}",
    st.integers(0, 10**25) | st.floats(0, 1e30),
    st.sampled_from(["ns", "ms", "s", "m", "h", ""]),
)
HEADER_ROUTES = [path for path, _ in ROUTES] + ["/v1/images/edits"]


@pytest.mark.parametrize("path", HEADER_ROUTES)
def test_no_header_makes_a_server_error(client: TestClient, path: str) -> None:
    """Prefer, Cancel-After and Idempotency-Key as sent, on every create route (and the list after)."""
    auth = {**AUTH, "x-key": API_KEY}
    body = {"prompt": "p"}
    shape = dict(ROUTES).get(path, lambda b: b)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        prefer=header_text | st.builds("wait={}".format, header_text),
        cancel_after=header_text | durations,
        idem=header_text,
    )
    def check(prefer: str, cancel_after: str, idem: str) -> None:
        headers = {**auth, "Prefer": prefer, "Cancel-After": cancel_after, "Idempotency-Key": idem}
        encoded = {k: v.encode("latin-1") for k, v in headers.items()}
        if path.endswith("/edits"):
            resp = client.post(path, data=body, files={"image": ("a.png", b"not a png")}, headers=encoded)
        else:
            resp = client.post(path, json=shape(body), headers=encoded)
        assert resp.status_code < 500, (headers, resp.text)

    check()
    # Whatever was accepted still renders.
    assert client.get("/v1/predictions", headers=auth).status_code == 200


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def test_no_cursor_makes_a_server_error(client: TestClient) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cursor=st.text(max_size=40) | st.builds(_cursor, json_values))
    def check(cursor: str) -> None:
        resp = client.get("/v1/predictions", params={"cursor": cursor}, headers=AUTH)
        assert resp.status_code in (200, 422), (cursor, resp.text)

    check()


def test_the_audits_inputs_that_were_500s_are_4xx(client: TestClient) -> None:
    create = "/v1/models/black-forest-labs/flux-schnell/predictions"
    body = {"input": {"prompt": "p"}}
    wait = client.post(create, json=body, headers={**AUTH, "Prefer": "wait=\u00b2".encode("latin-1")})  # type: ignore[dict-item]
    assert wait.status_code == 422 and "Prefer" in wait.json()["detail"]
    for cursor in (_cursor([10**400, "x"]), base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).decode()):
        resp = client.get("/v1/predictions", params={"cursor": cursor}, headers=AUTH)
        assert resp.status_code == 422 and resp.json()["invalid_fields"][0]["field"] == "cursor", resp.text
    metrics = client.get("/metrics", headers={"Authorization": "Bearer caf\u00e9".encode("latin-1")})  # type: ignore[dict-item]
    assert metrics.status_code in (200, 403)  # loopback may read it; never a 500
    key = client.post(create, json=body, headers={**AUTH, "Idempotency-Key": "k" * 256})
    assert key.status_code == 422 and key.json()["invalid_fields"][0]["field"] == "Idempotency-Key", key.text
    assert client.post(create, json=body, headers={**AUTH, "Idempotency-Key": "k" * 255}).status_code == 201
