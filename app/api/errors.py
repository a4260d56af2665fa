"""The one error boundary: every failure leaves as OpenAI's error envelope, and every response
carries the request id that the logs name."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import TunehouseError, error_body
from app.core.logs import REQUEST_ID

log = logging.getLogger("tunehouse.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
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
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if not retry:
        headers["x-should-retry"] = "false"
    body = error_body(message, type=type or _TYPES.get(status, "api_error"), param=param, code=code)
    return JSONResponse(body, status_code=status, headers=headers)


# Parts of a pydantic error location that name a member of a union, not a field:
# "str", "constrained-str", "list[str]", "literal['auto']", "function-after[...]".
_UNION_MEMBER = re.compile(r"(constrained-)?(str|int|float|bool|bytes|none)|.*\[.*\]|function-.*")


def _param(loc: tuple[object, ...]) -> str | None:
    # ("body", "hyperparameters", "n_epochs") -> "hyperparameters.n_epochs"
    parts = [
        str(p)
        for p in loc
        if p not in ("body", "query", "path", "header") and not _UNION_MEMBER.fullmatch(str(p))
    ]
    return ".".join(parts) or None


def _most_specific(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Of the errors about the first invalid parameter, the deepest: for a union such as
    ``str | list[str] | list[list[float]]``, the member that matched furthest says best what
    is wrong (a NaN in a row, rather than "should be a valid string")."""
    if not errors:
        return {}
    top = tuple(errors[0].get("loc", ()))[:2]
    same = [e for e in errors if tuple(e.get("loc", ()))[:2] == top]
    return max(same, key=lambda e: len(e.get("loc", ())))


def domain_error_response(exc: TunehouseError) -> JSONResponse:
    """The envelope of a domain error (also sent by middleware, outside the handlers)."""
    return envelope(
        exc.status_code,
        exc.message,
        type=exc.error_type,
        param=exc.param,
        code=exc.code,
        retry=exc.retryable,
        headers=exc.headers,
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(TunehouseError)
    async def _domain(_: Request, exc: TunehouseError) -> JSONResponse:
        return domain_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = _most_specific(list(exc.errors()))
        loc = tuple(first.get("loc", ()))
        param = _param(loc)
        if first.get("type") == "json_invalid":
            return envelope(400, "The request body is not valid JSON.", retry=False)
        message = str(first.get("msg", "Invalid request"))
        message = message.removeprefix("Value error, ")
        text = f"Invalid value for '{param}': {message}" if param else message
        return envelope(400, text, param=param, code="invalid_value", retry=False)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "Request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "Unknown URL: no such route."
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            message = f"Method {request.method} is not allowed here; use {headers['Allow']}."
        return envelope(exc.status_code, message, headers=headers)


_PROBED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route answers at this URL. Starlette's own ``Allow`` names only the
    methods of the first route whose path matched, while RFC 9110 asks for all of the
    resource's (GET and POST on /v1/files are two routes)."""
    allowed = []
    for method in _PROBED_METHODS:
        # A fresh "fastapi" entry: the real request's routing state must not steer the probe.
        probe = {**request.scope, "method": method, "fastapi": {}}
        if any(route.matches(probe)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


REQUEST_ID_HEADER = "x-request-id"
# An incoming id is kept if it is short and printable ASCII without spaces; else we make one.
_SANE_REQUEST_ID = re.compile(r"[!-~]{1,128}")


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name.lower() == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            if _SANE_REQUEST_ID.fullmatch(text):
                return text
            break
    return f"req_{uuid.uuid4().hex}"


class ErrorBoundary:
    """The outermost middleware (pure ASGI). It gives every response an ``x-request-id`` and
    turns any exception the app lets out into a 500 envelope, logged with its traceback and the
    request id, without internals in the body.

    It must not re-raise: Starlette's ServerErrorMiddleware (which runs an ``Exception``
    handler) renders its 500 and then raises again, and uvicorn answers that by closing the
    keep-alive connection under the client."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        # Every line logged for this request names it (app/core/logs.py), uvicorn's access
        # line too: it is logged as the response starts, inside this call.
        logged_as = REQUEST_ID.set(request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                header = (REQUEST_ID_HEADER.encode(), request_id.encode())
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unhandled error on %s %s (request %s)",
                scope.get("method"),
                scope.get("path"),
                request_id,
                extra={"request_id": request_id},
            )
            if started:
                # Mid-stream the status is gone: the response just ends, as it must.
                return
            response = envelope(
                500, "The server had an error while processing your request.", type="server_error"
            )
            await response(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(logged_as)
