"""What happens to a request before the app reads a byte of its body.

FastAPI reads and parses a route's body before it solves the route's dependencies, so a
dependency that checks the API key comes too late: an anonymous client could make the server
read and parse any amount of JSON first. ``RequestGuard``, a pure ASGI middleware, therefore
authenticates every ``/v1`` request from its headers alone (with a database session of its own,
closed before the body is read), then bounds the body: in size (a declared ``Content-Length``
over the limit is refused unread; a chunked body is counted as it arrives) and in time (a body
that stops arriving for ``request_body_timeout_seconds`` is answered with a 408 and the
connection is closed). The route's dependencies reuse the caller it found (``app/api/deps.py``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.security.utils import get_authorization_scheme_param
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import domain_error_response
from app.api.ratelimit import KeyRateLimiter, limiter_for
from app.core.db import session_scope
from app.core.errors import InvalidRequest, TooLarge, TunehouseError, Unauthorized
from app.core.logs import ORGANIZATION_ID
from app.core.settings import Settings
from app.models import ApiKey, Organization
from app.services import keys
from app.services.uploads import FORM_OVERHEAD_BYTES

# Every route under this prefix needs an API key (the HTTP contract); the operations routes
# (/healthz, /readyz, /metrics) and the API's documents do not.
AUTHENTICATED_PREFIX = "/v1"
CALLER_STATE = "caller"


@dataclass(frozen=True)
class Caller:
    """The authenticated key of a request, and its organization (both detached rows)."""

    key: ApiKey
    organization: Organization


def authenticate(
    settings: Settings, limiter: KeyRateLimiter | None, authorization: str | None
) -> Caller:
    """The caller of an ``Authorization: Bearer <key>`` header: a valid, unrevoked key within
    its rate limit, whose last use is recorded. One short session, committed and closed here."""
    scheme, token = get_authorization_scheme_param(authorization)
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    with session_scope(settings.sqlalchemy_url) as session:
        record = keys.authenticate(session, token)
        if limiter is not None:
            limiter.check(record.id)
        keys.touch_last_used(session, record)
        organization = keys.organization_of(session, record)
    return Caller(record, organization)


class BodyTimedOut(TunehouseError):
    status_code = 408


class BodyRefused(StarletteHTTPException):
    """Raised from the app's ``receive`` when the body breaks a bound, carrying the domain
    error to answer with. An HTTPException because FastAPI lets only those out of its body
    parsing (anything else becomes a 400 "error parsing the body"); ``install`` registers the
    handler that renders it. The rest of the body is never read, so the connection closes."""

    def __init__(self, error: TunehouseError) -> None:
        super().__init__(error.status_code, error.message, {"Connection": "close"})
        self.error = error


async def _answer_refused_body(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, BodyRefused)
    response = domain_error_response(exc.error)
    response.headers["Connection"] = "close"
    return response


@dataclass(frozen=True)
class BodyLimit:
    max_bytes: int
    too_large: str  # the message when the body passes max_bytes
    param: str | None
    code: str

    def refusal(self) -> BodyRefused:
        return BodyRefused(TooLarge(self.too_large, param=self.param, code=self.code))


class _BoundedReceive:
    """The app's ``receive``: each body chunk must come within ``timeout`` seconds, and all of
    them together stay within the limit. Once the body is complete, a plain pass-through (a
    streaming response waits on it for the client's disconnect, as long as it likes)."""

    def __init__(self, receive: Receive, limit: BodyLimit, timeout: float) -> None:
        self.receive, self.limit, self.timeout = receive, limit, timeout
        self.received = 0
        self.complete = False

    async def __call__(self) -> Message:
        if self.complete:
            return await self.receive()
        try:
            with anyio.fail_after(self.timeout):
                message = await self.receive()
        except TimeoutError:
            timed_out = BodyTimedOut(
                f"The request body stopped arriving: nothing came for {self.timeout:g} s "
                "(request_body_timeout_seconds).",
                code="request_body_timeout",
            )
            raise BodyRefused(timed_out) from None
        if message["type"] != "http.request":
            self.complete = True  # the client went away
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.limit.max_bytes:
            raise self.limit.refusal()
        self.complete = not message.get("more_body", False)
        return message


class RequestGuard:
    """Authenticate ``/v1`` requests from their headers, then bound their bodies (see the
    module's docstring). ``uploads`` names the (method, path) of the streamed multipart routes,
    which take up to ``max_upload_bytes``; every other body is JSON, up to
    ``max_json_body_bytes``."""

    def __init__(self, app: ASGIApp, settings: Settings, uploads: Collection[tuple[str, str]]):
        self.app, self.settings, self.uploads = app, settings, set(uploads)
        upload_bytes, json_bytes = settings.max_upload_bytes, settings.max_json_body_bytes
        self.upload_limit = BodyLimit(
            upload_bytes + FORM_OVERHEAD_BYTES,
            f"The request body is over this server's upload limit of {upload_bytes} bytes "
            "(max_upload_bytes).",
            param="file",
            code="file_too_large",
        )
        self.json_limit = BodyLimit(
            json_bytes,
            f"The request body is over this server's limit of {json_bytes} bytes for JSON "
            "bodies (max_json_body_bytes).",
            param=None,
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = _route_path(scope)
        organization = None  # the context variable's token, once the caller is known
        try:
            if path == AUTHENTICATED_PREFIX or path.startswith(AUTHENTICATED_PREFIX + "/"):
                limiter = limiter_for(scope["app"], self.settings)
                caller = await run_in_threadpool(
                    authenticate, self.settings, limiter, headers.get("authorization")
                )
                scope.setdefault("state", {})[CALLER_STATE] = caller
                # The request's lines name its organization from here on (app/core/logs.py).
                organization = ORGANIZATION_ID.set(caller.organization.id)
            upload = (scope["method"], path) in self.uploads
            limit = self.upload_limit if upload else self.json_limit
            # An upload's declared size is checked by the upload itself (app/services/uploads),
            # with the form's overhead counted.
            if not upload:
                _refuse_declared_size(headers, limit)
        except TunehouseError as exc:
            response = domain_error_response(exc)
            if _has_body(headers):
                response.headers["Connection"] = "close"  # its body is never read
            await response(scope, receive, send)
            return
        bounded = _BoundedReceive(receive, limit, self.settings.request_body_timeout_seconds)
        try:
            await self.app(scope, bounded, send)
        finally:
            if organization is not None:
                ORGANIZATION_ID.reset(organization)


def install(app: FastAPI, settings: Settings, uploads: Collection[tuple[str, str]]) -> None:
    """Add the guard to ``app``, with the handler of the refusals raised from its receive."""
    app.add_middleware(RequestGuard, settings=settings, uploads=uploads)
    app.add_exception_handler(BodyRefused, _answer_refused_body)


def _refuse_declared_size(headers: Headers, limit: BodyLimit) -> None:
    declared = headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise InvalidRequest("The Content-Length header is not a number.") from None
    if size > limit.max_bytes:
        raise TooLarge(limit.too_large, param=limit.param, code=limit.code)


def _has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


def _route_path(scope: Scope) -> str:
    """The path the app routes on: without the ``root_path`` a proxy may mount it under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
