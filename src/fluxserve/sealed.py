"""Secrets a client hands over to be used later (BFL's webhook_secret) are stored sealed.

The server needs them in clear to sign each delivery, so they can't be hashed; they are kept with
AES-256-GCM under a key derived from the server secret, which lives outside the database (a
leaked database file alone gives them away no longer).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "sealed:v1:"
_PURPOSE = b"fluxserve webhook secrets v1"


def _key(server_secret: bytes) -> bytes:
    return hmac.new(server_secret, _PURPOSE, hashlib.sha256).digest()


def seal(server_secret: bytes, value: str) -> str:
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_key(server_secret)).encrypt(nonce, value.encode(), _PURPOSE)
    return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()


def unseal(server_secret: bytes, value: str) -> str:
    """The clear value; a value stored before sealing existed is returned as it is."""
    if not value.startswith(PREFIX):
        return value
    raw = base64.urlsafe_b64decode(value.removeprefix(PREFIX))
    return AESGCM(_key(server_secret)).decrypt(raw[:12], raw[12:], _PURPOSE).decode()
