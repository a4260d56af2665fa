"""The one error boundary: every failure leaves as OpenAI's error envelope."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import TunehouseError

log = logging.getLogger("tunehouse.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def envelope(
    status: int,
    message: str,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    retry: bool = True,
) -> JSONResponse:
    headers = {} if retry else {"x-should-retry": "false"}
    body = {
        "error": {
            "message": message,
            "type": type or _TYPES.get(status, "api_error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _param(loc: tuple[object, ...]) -> str | None:
    # ("body", "hyperparameters", "n_epochs") -> "hyperparameters.n_epochs"
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(TunehouseError)
    async def _domain(_: Request, exc: TunehouseError) -> JSONResponse:
        return envelope(
            exc.status_code,
            exc.message,
            type=exc.error_type,
            param=exc.param,
            code=exc.code,
            retry=exc.retryable,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = tuple(first.get("loc", ()))
        param = _param(loc)
        if first.get("type") == "json_invalid":
            return envelope(400, "The request body is not valid JSON.", retry=False)
        message = str(first.get("msg", "Invalid request"))
        message = message.removeprefix("Value error, ")
        text = f"Invalid value for '{param}': {message}" if param else message
        return envelope(400, text, param=param, code="invalid_value", retry=False)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "Request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "Unknown URL: no such route."
        return envelope(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return envelope(500, "The server had an error processing your request.", type="api_error")
