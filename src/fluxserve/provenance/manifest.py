"""C2PA manifests: written with the reference library's bindings (c2pa-python) and read back the same way."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import c2pa

from .. import __version__

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}
ASSERTION = "com.fluxserve.generation"  # our own: the mark (and the prompt, where the operator opts in)
_AGENT = {"name": "fluxserve", "version": __version__}
# No thumbnail in the manifest: c2pa-rs makes one by default, decoding and re-encoding the image (100 ms and
# 30 KB at 1 MP here, against 3 ms and 3 KB without), and it would show what the image is to anyone who reads it.
# Nothing fetched, ever: by default the library fetches a manifest a file names by URL (a remote manifest) and
# OCSP answers, which would let any uploaded image make this server send requests where it says.
_OFFLINE = {"remote_manifest_fetch": False, "ocsp_fetch": False}
_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}, "verify": _OFFLINE}


@dataclass(frozen=True)
class Ingredient:
    data: bytes
    fmt: str  # a key of MIME
    title: str


@dataclass(frozen=True)
class Claim:
    """What a manifest says of one output."""

    model: str
    when: float
    mark: int
    prompt: str | None = None  # only where the operator opted in
    inputs: tuple[Ingredient, ...] = ()  # an edit's input images, the first its parent
    source: Ingredient | None = None  # an upstream's answer as it came (with the provider's manifest, if any)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def definition(claim: Claim, fmt: str) -> dict[str, Any]:
    """The manifest definition: created from a prompt, or opened from a parent (an edit's first input, an
    upstream's answer) and changed by a model."""
    made: dict[str, Any] = {
        "softwareAgent": _AGENT,
        "when": _when(claim.when),
        "parameters": {"model": claim.model},
    }
    parent = claim.source or (claim.inputs[0] if claim.inputs else None)
    if parent is None:
        actions = [{"action": "c2pa.created", "digitalSourceType": TRAINED, **made}]
    else:
        # C2PA: a manifest with a parent opens it first; the model's work is an edit of it (composite for an
        # edit of the client's images; for an upstream answer the model made all of it).
        source = TRAINED if claim.source is not None else COMPOSITE
        actions = [
            {"action": "c2pa.opened", "parameters": {"ingredientIds": ["parent"]}},
            {"action": "c2pa.edited", "digitalSourceType": source, **made},
        ]
    generation: dict[str, Any] = {"mark": f"{claim.mark:012x}"}
    if claim.prompt is not None:
        generation["prompt"] = claim.prompt
    return {
        "claim_generator_info": [_AGENT],
        "title": f"image.{fmt}",
        "format": MIME[fmt],
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": actions}},
            {"label": ASSERTION, "data": generation},
        ],
    }


class Signer:
    """Signs encoded images; one per process (the library's signer holds the key)."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, alg: bytes) -> None:
        self._info = c2pa.C2paSignerInfo(alg, cert_pem, key_pem, None)

    def sign(self, data: bytes, fmt: str, claim: Claim) -> bytes:
        parent = claim.source or (claim.inputs[0] if claim.inputs else None)
        ingredients = [(i, "parentOf" if i is parent else "componentOf") for i in (*claim.inputs, claim.source)]
        signer = c2pa.Signer.from_info(self._info)
        with (
            c2pa.Context(c2pa.Settings.from_dict(_SETTINGS)) as context,
            c2pa.Builder(definition(claim, fmt), context) as builder,
        ):
            for ing, relation in ingredients:
                if ing is None:
                    continue
                spec: dict[str, Any] = {"title": ing.title, "relationship": relation}
                if relation == "parentOf":
                    spec["label"] = "parent"
                builder.add_ingredient(spec, MIME[ing.fmt], io.BytesIO(ing.data))
            out = io.BytesIO()
            builder.sign(signer, MIME[fmt], io.BytesIO(data), out)
        signer.close()
        return out.getvalue()


@dataclass(frozen=True)
class Found:
    """A file's C2PA manifest as read: the validation state in OpenAI's words."""

    state: str  # trusted, valid, invalid, not_present
    issuer: str | None = None
    model: str | None = None
    generated_at: str | None = None
    mark: int | None = None  # ours: the mark our assertion records


def read(data: bytes, fmt: str) -> Found:
    try:
        with (
            c2pa.Context(c2pa.Settings.from_dict({"verify": _OFFLINE})) as context,
            c2pa.Reader(MIME[fmt], io.BytesIO(data), context=context) as reader,
        ):
            state = str(reader.get_validation_state() or "invalid").lower()
            store = json.loads(reader.json())
    except c2pa.C2paError as exc:
        # No manifest at all reads as an error too (and one only named by URL: it is not fetched); anything
        # else is a manifest that could not be read.
        said = type(exc).__name__ + str(exc)
        return Found("not_present" if "NotFound" in said or "Remote" in said else "invalid")
    active = store.get("manifests", {}).get(store.get("active_manifest") or "", {})
    signature = active.get("signature_info") or {}
    found: dict[str, Any] = {"issuer": signature.get("common_name") or signature.get("issuer")}
    for assertion in active.get("assertions", []):
        body = assertion.get("data") or {}
        if assertion.get("label", "").startswith("c2pa.actions"):
            for action in body.get("actions", []):
                found["model"] = found.get("model") or (action.get("parameters") or {}).get("model")
                found["generated_at"] = found.get("generated_at") or action.get("when")
        elif assertion.get("label") == ASSERTION and isinstance(body.get("mark"), str):
            try:
                found["mark"] = int(body["mark"], 16)
            except ValueError:
                found["mark"] = None
    found["generated_at"] = found.get("generated_at") or signature.get("time")
    return Found(state if state in ("trusted", "valid") else "invalid", **found)
