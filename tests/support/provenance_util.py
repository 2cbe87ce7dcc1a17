"""Provenance fixtures: a photo-like test image, an operator's CA + leaf certificate, C2PA reads."""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import c2pa
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image


def photo(size: int = 1024, seed: int = 0) -> Image.Image:
    """Smooth gradients with coarse noise: closer to a generated image than a flat colour."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, size)
    base = np.stack([np.outer(x, x) * 255, np.outer(1 - x, x) * 200 + 30, np.outer(x, 1 - x) * 180 + 40], -1)
    coarse = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return Image.fromarray(np.clip(base * 0.6 + np.asarray(coarse, float) * 0.4, 0, 255).astype(np.uint8))


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")]
    )


def operator_pair(cn: str = "Acme Images signing") -> tuple[str, str]:
    """(chain PEM: leaf then CA, key PEM) as an operator's own CA would issue them."""
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Acme Root"))
        .issuer_name(_name("Acme Root"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name("Acme Root"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=365 * 5))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    chain = leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain.decode(), key_pem.decode()


MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def c2pa_report(data: bytes) -> tuple[str, list[str], dict[str, Any]]:
    """The reference reader's verdict: (validation state, failure codes, the active manifest)."""
    fmt = Image.open(io.BytesIO(data)).format
    with c2pa.Reader(MIME[str(fmt)], io.BytesIO(data)) as reader:
        state = str(reader.get_validation_state())
        store = json.loads(reader.json())
    failures = [s["code"] for s in store.get("validation_status", []) if s.get("code")]
    return state, failures, store["manifests"][store["active_manifest"]]


def actions(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return next(a["data"]["actions"] for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))


def stripped(data: bytes, fmt: str = "JPEG", **kw: Any) -> bytes:
    """The pixels alone, re-encoded: every metadata block (and the manifest) gone."""
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format=fmt, **kw)
    return out.getvalue()
