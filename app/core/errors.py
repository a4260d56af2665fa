"""Domain errors. Services raise these; one handler turns them into OpenAI's error envelope."""

from __future__ import annotations

from typing import Any


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope: the body of every error response, and of the event that ends a
    stream whose status has already been sent."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class TunehouseError(Exception):
    status_code = 400
    error_type = "invalid_request_error"
    # Deterministic failures tell the SDK not to retry (it retries 409 and 5xx by default).
    retryable = True
    # Extra response headers (Retry-After for a rate limit).
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(TunehouseError):
    status_code = 400


class Unauthorized(TunehouseError):
    status_code = 401
    error_type = "authentication_error"


class Forbidden(TunehouseError):
    status_code = 403
    error_type = "permission_error"
    retryable = False


class NotFound(TunehouseError):
    status_code = 404
    error_type = "not_found_error"


class Conflict(TunehouseError):
    status_code = 409
    error_type = "conflict_error"
    retryable = False


class Unprocessable(TunehouseError):
    """Well-formed, but it contradicts what the server already holds (a reused idempotency key)."""

    status_code = 422
    retryable = False


class TooLarge(TunehouseError):
    status_code = 413
    error_type = "request_too_large"


class InsufficientStorage(TunehouseError):
    """The server's disk is full (RFC 4918's 507): its fault, not the request's, and it may
    pass, so the SDK may retry."""

    status_code = 507
    error_type = "server_error"


class ServiceUnavailable(TunehouseError):
    status_code = 503
    error_type = "service_unavailable"


class RateLimited(TunehouseError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int, code: str = "rate_limit_exceeded"):
        super().__init__(message, code=code)
        self.headers = {"Retry-After": str(retry_after)}
