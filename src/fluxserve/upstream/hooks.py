"""A provider's webhook for an upstream task (BFL's): the URL and secret fluxserve gives it at submit, and the
check of what arrives. The webhook only wakes the worker that polls the task, which then reads the result as
it would at its next poll: polling stays the truth and the fallback (a hook that never comes, or one that
reaches another node, costs only the poll interval)."""

from __future__ import annotations

import hashlib
import hmac

HOOK_PATH = "/v1/upstream-hooks"


def hook_secret(server_secret: bytes, upstream: str, ref: str) -> str:
    """The secret of one task's webhook, derived from the server secret: any node can check it, nothing stored."""
    return hmac.new(server_secret, f"upstream-hook:{upstream}:{ref}".encode(), hashlib.sha256).hexdigest()


def hook_url(public_url: str, upstream: str, ref: str) -> str:
    return f"{public_url.rstrip('/')}{HOOK_PATH}/{upstream}/{ref}"


def task_ref(job_id: str, index: int) -> str:
    return f"{job_id}-{index}"


def job_of(ref: str) -> str:
    return ref.rsplit("-", 1)[0]


def signed_by(secret: str, body: bytes, header: str | None) -> bool:
    """BFL's X-BFL-Signature: sha256=<hex HMAC-SHA256 of the raw body with the webhook_secret>."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return header is not None and hmac.compare_digest(header.strip(), expected)
