"""The exception hierarchy: what went wrong, in words and a machine code, with no HTTP in it.

api/errors.py maps each class to a status and error type, and each dialect renders it in its own envelope.
"""

from __future__ import annotations


class FluxServeError(Exception):
    code = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        details: list[dict[str, object]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # Every field error, as [{"loc": [...], "msg": ..., "type": ...}] (dialects that list them all).
        self.details = details
        if code is not None:
            self.code = code


class InvalidInput(FluxServeError):
    code = "invalid_value"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"


class RequestTimeout(InvalidInput):
    code = "request_timeout"


class Unauthorized(FluxServeError):
    code = "invalid_api_key"


class Forbidden(FluxServeError):
    code = "invalid_signature"


class NotFound(FluxServeError):
    code = "not_found"


class Gone(FluxServeError):
    code = "file_expired"


class Conflict(FluxServeError):
    code = "idempotency_conflict"


class RateLimited(FluxServeError):
    """A per-key limit (fluxserve.limits) refused a create; it names the limit and when to retry."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers


class QuotaExceeded(FluxServeError):
    """A key's stored files would pass its quota; deleting files (or their expiry) makes room."""

    code = "file_quota_exceeded"


class PaymentRequired(FluxServeError):
    """The key's credits do not cover this request's price."""

    code = "insufficient_credits"


class ClientDisconnected(FluxServeError):
    """The client went away while waiting; nobody reads this response."""

    code = "client_closed_request"


class GenerationFailed(FluxServeError):
    code = "generation_failed"


class UpstreamFailed(GenerationFailed):
    """The provider behind this server could not serve the job (its account, its setup): a 502, not the
    client's fault."""

    code = "upstream_account_error"


class OutOfMemory(GenerationFailed):
    """The device ran out of memory for this call; smaller calls may still fit."""


class StoreUnavailable(FluxServeError):
    """The database could not be reached or written (locked, disk full, connection lost); retry later."""

    code = "store_unavailable"
