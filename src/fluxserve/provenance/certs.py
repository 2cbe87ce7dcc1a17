"""The certificate and key that sign C2PA manifests: the operator's (PEM), or one made from the server secret.

The self-signed one is derived from the server secret, not stored: every node that shares the secret (the
FLUXSERVE_SECRET, the database's on PostgreSQL, the data dir's on one box) makes the same key and name, so they
sign alike with nothing new to copy between them. c2pa-rs accepts a signing certificate only with KeyUsage
digitalSignature, an ExtendedKeyUsage it knows (emailProtection here; documentSigning is refused) and an
authority key identifier; it then reads back as valid, with the one finding `signingCredential.untrusted`
(no trust list has it), which is what validators will say of it."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SELF_SIGNED_NAME = "fluxserve self-signed"
# The order of P-256's group: a scalar is taken below it.
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def pem(value: str, *, what: str) -> bytes:
    """A PEM given as its text or as a path to it."""
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{what}: no such file {value!r} (give a PEM file's path or its text)")
    return path.read_bytes()


def check_pair(cert_pem: bytes, key_pem: bytes) -> str:
    """The certificate's subject, once it and the key are known to belong together (else ValueError)."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise ValueError(f"the C2PA certificate or key is not a readable PEM: {exc}") from exc
    if chain[0].public_key() != key.public_key():
        raise ValueError("the C2PA key is not the key of the certificate (the first one in its PEM)")
    return chain[0].subject.rfc4514_string()


def self_signed(secret: bytes) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM), the same for the same server secret."""
    digest = hmac.new(secret, b"fluxserve c2pa signing key v1", hashlib.sha512).digest()
    key = ec.derive_private_key(int.from_bytes(digest) % (_P256_ORDER - 1) + 1, ec.SECP256R1())
    fingerprint = hashlib.sha256(
        key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).hexdigest()[:16]
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{SELF_SIGNED_NAME} {fingerprint}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fluxserve"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int(fingerprint, 16))
        .not_valid_before(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2046, 1, 1, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def signing_alg(key_pem: bytes) -> bytes:
    """The C2PA algorithm name for a key: es256/384/512 for EC keys by curve, ps256 for RSA, ed25519."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {256: b"es256", 384: b"es384", 521: b"es512"}[key.curve.key_size]
    if isinstance(key, rsa.RSAPrivateKey):
        return b"ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return b"ed25519"
    raise ValueError(f"C2PA cannot sign with a {type(key).__name__}; use an EC (P-256) or RSA key")
