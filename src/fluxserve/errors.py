"""The exception hierarchy. Each dialect renders these in its own envelope (api/errors.py)."""

from __future__ import annotations


class FluxServeError(Exception):
    status_code = 500
    code = "server_error"
    type = "server_error"

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
    status_code = 400
    code = "invalid_value"
    type = "invalid_request_error"


class PayloadTooLarge(InvalidInput):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(InvalidInput):
    status_code = 415
    code = "unsupported_media_type"


class RequestTimeout(InvalidInput):
    status_code = 408
    code = "request_timeout"


class Unauthorized(FluxServeError):
    status_code = 401
    code = "invalid_api_key"
    type = "invalid_request_error"


class Forbidden(FluxServeError):
    status_code = 403
    code = "invalid_signature"
    type = "invalid_request_error"


class NotFound(FluxServeError):
    status_code = 404
    code = "not_found"
    type = "invalid_request_error"


class Gone(FluxServeError):
    status_code = 410
    code = "file_expired"
    type = "invalid_request_error"


class Conflict(FluxServeError):
    status_code = 409
    code = "idempotency_conflict"
    type = "invalid_request_error"


class RateLimited(FluxServeError):
    """A per-key limit (fluxserve.limits) refused a create; it names the limit and when to retry."""

    status_code = 429
    code = "rate_limit_exceeded"
    type = "requests"

    def __init__(self, message: str, *, retry_after: int, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers


class ClientDisconnected(FluxServeError):
    """The client went away while waiting; nobody reads this response."""

    status_code = 499
    code = "client_closed_request"
    type = "invalid_request_error"


class GenerationFailed(FluxServeError):
    status_code = 500
    code = "generation_failed"
    type = "server_error"


class OutOfMemory(GenerationFailed):
    """The device ran out of memory for this call; smaller calls may still fit."""


class StoreUnavailable(FluxServeError):
    """The database could not be reached or written (locked, disk full, connection lost); retry later."""

    status_code = 503
    code = "store_unavailable"
    type = "server_error"


class LeaseLost(FluxServeError):
    """This worker's claim on a job was taken away (its lease expired); it must not write the result."""

    code = "lease_lost"
