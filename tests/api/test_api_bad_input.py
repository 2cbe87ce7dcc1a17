"""Every bad input gets a 4xx in the OpenAI envelope that names the field; never a 500."""

import base64
import io
import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import API_KEY, AUTH

GEN = "/v1/images/generations"
VMODEL = "/vmodel/generate"


def _assert_error(resp: Any, status: int, param: str | None, *words: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({}, "prompt", ["Missing"]),
        ({"prompt": 5}, "prompt", ["string"]),
        ({"prompt": ""}, "prompt", ["empty"]),
        ({"prompt": "x" * 100_000}, "prompt", ["32000"]),
        ({"prompt": "a", "model": "dall-e-9"}, "model", ["flux-schnell"]),
        ({"prompt": "a", "model": 3}, "model", ["string"]),
        ({"prompt": "a", "n": 0}, "n", ["greater than or equal to 1"]),
        ({"prompt": "a", "n": 11}, "n", ["less than or equal to 10"]),
        ({"prompt": "a", "n": "2"}, "n", ["integer"]),
        ({"prompt": "a", "n": 1.5}, "n", ["integer"]),
        ({"prompt": "a", "size": "1000x1000"}, "size", ["multiples of 16"]),
        ({"prompt": "a", "size": "4096x4096"}, "size", ["2048"]),
        ({"prompt": "a", "size": "huge"}, "size", ["WxH"]),
        ({"prompt": "a", "size": 1024}, "size", ["string"]),
        ({"prompt": "a", "response_format": "png"}, "response_format", ["url", "b64_json"]),
        ({"prompt": "a", "output_format": "gif"}, "output_format", ["png", "jpeg", "webp"]),
        ({"prompt": "a", "output_compression": 101}, "output_compression", ["100"]),
        ({"prompt": "a", "quality": "ultra"}, "quality", ["hd"]),
        ({"prompt": "a", "style": "cartoon"}, "style", ["vivid"]),
        ({"prompt": "a", "seed": -3}, "seed", ["between 0"]),
        ({"prompt": "a", "model": "flux", "steps": 9}, "steps", ["between 1 and 4"]),
        ({"prompt": "a", "model": "flux-dev", "steps": 0}, "steps", ["between 1 and 50"]),
        ({"prompt": "a", "stream": True, "partial_images": 4}, "partial_images", ["3"]),
    ],
)
def test_generations_bad_fields(client: TestClient, body: dict[str, Any], param: str, words: list[str]) -> None:
    _assert_error(client.post(GEN, json=body, headers=AUTH), 400, param, *words)


VALID_INPUT = {"prompt": "空气", "num_outputs": 1, "aspect_ratio": "1:1", "output_format": "jpg", "output_quality": 80}


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"prompt": None}, "input.prompt", ["string"]),
        ({"prompt": ""}, "input.prompt", ["empty"]),
        ({"prompt": "y" * 100_000}, "input.prompt", ["32000"]),
        ({"num_outputs": 0}, "input.num_outputs", ["greater than or equal to 1"]),
        ({"num_outputs": 5}, "input.num_outputs", ["less than or equal to 4"]),
        ({"num_outputs": "1"}, "input.num_outputs", ["integer"]),
        ({"aspect_ratio": "7:5"}, "input.aspect_ratio", ["21:9", "4:5"]),
        ({"aspect_ratio": 1}, "input.aspect_ratio", ["string"]),
        ({"output_format": "jpeg"}, "input.output_format", ["jpg", "png", "webp"]),
        ({"output_quality": 0}, "input.output_quality", ["greater than or equal to 1"]),
        ({"output_quality": 101}, "input.output_quality", ["less than or equal to 100"]),
        ({"seed": 2**40}, "input.seed", ["between 0 and 4294967295"]),
        ({"seed": "x"}, "input.seed", ["integer"]),
        ({"num_inference_steps": 5}, "input.num_inference_steps", ["between 1 and 4"]),
        ({"megapixels": "2"}, "input.megapixels", ["'1'", "'0.25'"]),
        ({"megapixels": 1}, "input.megapixels", ["'1'"]),
        ({"colour": "red"}, "input.colour", ["Unknown parameter"]),
    ],
)
def test_vmodel_bad_fields(client: TestClient, change: dict[str, Any], param: str, words: list[str]) -> None:
    inp = {**VALID_INPUT, **change}
    _assert_error(client.post(VMODEL, json={"model": "flux-schnell", "input": inp}, headers=AUTH), 400, param, *words)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": VALID_INPUT}, "model", ["Missing"]),
        ({"model": "flux-ultra", "input": VALID_INPUT}, "model", ["flux, flux-schnell, flux-dev, flux-pro"]),
        ({"model": "flux"}, "input", ["Missing"]),
        ({"model": "flux", "input": "a cat"}, "input", ["dictionary"]),
        ({"model": "flux", "input": {}}, "input.prompt", ["Missing"]),
    ],
)
def test_vmodel_bad_envelope(client: TestClient, body: dict[str, Any], param: str, words: list[str]) -> None:
    _assert_error(client.post(VMODEL, json=body, headers=AUTH), 400, param, *words)


@pytest.mark.parametrize("path", [GEN, VMODEL])
def test_malformed_and_non_json_bodies(client: TestClient, path: str) -> None:
    json_ct = {**AUTH, "Content-Type": "application/json"}
    _assert_error(client.post(path, content=b'{"prompt": "a",', headers=json_ct), 400, "body", "not valid JSON")
    _assert_error(client.post(path, content=b"\xff\xfe", headers=json_ct), 400, "body", "not valid JSON")
    _assert_error(client.post(path, content=b"[1, 2]", headers=json_ct), 400, "body", "JSON object")
    _assert_error(client.post(path, content=b"", headers=json_ct), 400, "body")
    _assert_error(client.post(path, data={"prompt": "a"}, headers=AUTH), 415, "Content-Type", "application/json")
    _assert_error(
        client.post(path, content=b"prompt=a", headers={**AUTH, "Content-Type": "text/plain"}), 415, "Content-Type"
    )
    lone = b'"prompt": "\\ud800 x"'
    lone_surrogate = b"{%s}" % lone if path == GEN else b'{"model": "flux", "input": {%s}}' % lone
    resp = client.post(path, content=lone_surrogate, headers=json_ct)
    _assert_error(resp, 400, "prompt" if path == GEN else "input.prompt", "Unicode")
    for const in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"prompt": "a", "guidance": %s, "model": "flux", "input": {"prompt": "a", "guidance": %s}}'
        resp = client.post(path, content=body % (const, const), headers=json_ct)
        _assert_error(resp, 400, "body", "not valid JSON", const.decode())
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _assert_error(client.post(path, content=deep, headers=json_ct), 400, "body")
    big = b'{"prompt": "' + b"x" * (71 * 1024 * 1024) + b'"}'
    _assert_error(client.post(path, content=big, headers=json_ct), 413, "body", "larger")


@pytest.mark.parametrize("path", [GEN, VMODEL, "/v1/models"])
def test_missing_or_wrong_key_is_401(client: TestClient, path: str) -> None:
    for headers in [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}]:
        resp = client.request("GET" if path == "/v1/models" else "POST", path, json={"prompt": "a"}, headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] in ("invalid_api_key", "missing_api_key")


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    resp = client.get("/v1/nothing", headers=AUTH)
    assert resp.status_code == 404 and "error" in resp.json()
    resp = client.get(GEN, headers=AUTH)
    assert resp.status_code == 405 and "error" in resp.json()


def test_feed_of_unknown_id_is_404(client: TestClient) -> None:
    resp = client.get("/vmodel/feed/doesnotexist", headers=AUTH)
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "id"


PREDICT = "/v1/models/black-forest-labs/flux-schnell/predictions"


def test_header_and_query_values_that_used_to_give_500(client: TestClient) -> None:
    for cancel_after in ("999999999h", "99999999999999999999s", "169h"):
        resp = client.post(PREDICT, json={"input": {"prompt": "p"}}, headers={**AUTH, "Cancel-After": cancel_after})
        assert resp.status_code == 422 and "at most 168h" in resp.json()["detail"], resp.text
    assert client.post(PREDICT, json={"input": {"prompt": "p"}}, headers={**AUTH, "Cancel-After": "168h"}).is_success
    # Nothing half-made: the list renders, and holds only the accepted prediction.
    listed = client.get("/v1/predictions", headers=AUTH)
    assert listed.status_code == 200 and len(listed.json()["results"]) == 1
    resp = client.post(PREDICT, json={"input": {"prompt": "p"}}, headers={**AUTH, "Prefer": "wait="})
    assert resp.status_code == 422 and "Prefer" in resp.json()["detail"]
    for cursor in ("WzFlNDAwLCAiYSJd", "WzEsIDJd", "W3RydWUsICJhIl0="):  # [1e400, "a"], [1, 2], [true, "a"]
        resp = client.get("/v1/predictions", params={"cursor": cursor}, headers=AUTH)
        assert resp.status_code == 422 and "cursor" in resp.json()["detail"], resp.text


@pytest.mark.parametrize("url", ["http://[::1", "http://example.com:99999/hook"])
def test_unparseable_webhook_urls_are_4xx_in_each_dialect(client: TestClient, url: str) -> None:
    rep = client.post(PREDICT, json={"input": {"prompt": "p"}, "webhook": url}, headers=AUTH)
    assert rep.status_code == 422 and "webhook" in rep.json()["detail"], rep.text
    bfl = client.post("/v1/flux-dev", json={"prompt": "p", "webhook_url": url}, headers=AUTH)
    assert bfl.status_code == 422 and "webhook_url" in bfl.text, bfl.text


def test_bodies_are_bounded_while_they_stream(client: TestClient) -> None:
    big = b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    json_type = {**AUTH, "content-type": "application/json"}
    declared = client.post(GEN, content=big, headers=json_type)
    _assert_error(declared, 413, "body", "1048576 bytes")
    chunked = client.post(GEN, content=(big[i : i + 65536] for i in range(0, len(big), 65536)), headers=json_type)
    _assert_error(chunked, 413, "body", "1048576 bytes")
    # An image route takes more, up to 100 MB (tests/e2e/test_abuse.py shows a real upload cut short).
    multipart = {**AUTH, "content-type": "multipart/form-data; boundary=abc"}
    upload = (b"x" * 65536 for _ in range(200 * 16))
    _assert_error(client.post("/v1/images/edits", content=upload, headers=multipart), 413, "body", "104857600")


def test_a_pixel_bomb_request_is_refused_from_the_headers(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, format="PNG")  # 16 MP of one colour: about 16 KB
    bombs = [("image[]", (f"{i}.png", buf.getvalue(), "image/png")) for i in range(16)]
    start = time.perf_counter()
    resp = client.post("/v1/images/edits", data={"prompt": "p"}, files=bombs, headers=AUTH)
    _assert_error(resp, 400, "image", "64 megapixels in all", "80.0 so far")  # refused at the fifth
    assert time.perf_counter() - start < 3  # refused before 256 MP were decoded


def test_json_routes_have_the_same_pixel_budget(client: TestClient) -> None:
    """Data URLs in Replicate's input_images and BFL's input_image_N count against one 64 MP budget too."""
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, format="PNG")  # 36 MP of one colour
    bomb = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    start = time.perf_counter()
    rep = client.post(
        "/v1/models/black-forest-labs/flux-2-pro/predictions",
        json={"input": {"prompt": "p", "input_images": [bomb, bomb, bomb]}},
        headers=AUTH,
    )
    assert rep.status_code == 422 and "64 megapixels in all" in rep.text, rep.text
    bfl = client.post(
        "/v1/flux-kontext-pro",
        json={"prompt": "p", "input_image": bomb.split(",", 1)[1], "input_image_2": bomb.split(",", 1)[1]},
        headers={"x-key": API_KEY},
    )
    assert bfl.status_code == 422 and "64 megapixels in all" in bfl.text, bfl.text
    assert time.perf_counter() - start < 5  # refused before 108 MP were decoded


def test_unknown_fields_are_ignored_by_name_not_stored(client: TestClient) -> None:
    resp = client.post(GEN, json={"prompt": "p", "size": "256x256", "future_option": "y" * 500_000}, headers=AUTH)
    assert resp.status_code == 200
    store = client.app.state.services.store  # type: ignore[attr-defined]
    [job] = store.list_jobs(
        client.app.state.services.auth.env_owner(AUTH["Authorization"].split()[1]),
        "openai",  # type: ignore[attr-defined]
        before=None,
        limit=5,
    )
    assert job.request["ignored_fields"] == ["future_option"] and "future_option" not in job.request
    assert len(json.dumps(job.request)) < 1000


def test_vmodel_guidance_range_is_the_models(client: TestClient) -> None:
    inp = {**VALID_INPUT, "guidance": 11}
    resp = client.post(VMODEL, json={"model": "flux-dev", "input": inp}, headers=AUTH)
    _assert_error(resp, 400, "input.guidance", "between 0 and 10", "flux-dev")


def test_webhook_fields_are_capped(client: TestClient) -> None:
    create = "/v1/models/black-forest-labs/flux-schnell/predictions"
    flood = {"input": {"prompt": "p"}, "webhook": "https://example.com/h", "webhook_events_filter": ["start"] * 9}
    resp = client.post(create, json=flood, headers=AUTH)
    assert resp.status_code == 422 and resp.json()["invalid_fields"][0]["field"] == "webhook_events_filter"
    long_url = {"input": {"prompt": "p"}, "webhook": "https://example.com/" + "h" * 2100}
    assert client.post(create, json=long_url, headers=AUTH).json()["invalid_fields"][0]["field"] == "webhook"
    secret = {"prompt": "p", "webhook_url": "https://example.com/h", "webhook_secret": "s" * 1025}
    bfl = client.post("/v1/flux-dev", json=secret, headers={"x-key": API_KEY})
    assert bfl.status_code == 422 and bfl.json()["detail"][0]["loc"] == ["body", "webhook_secret"]
