"""Route dependencies: every need of a route is one Annotated alias."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.api.guard import CALLER_STATE, Caller, authenticate
from app.api.ratelimit import limiter_for
from app.core.db import new_session
from app.core.errors import Forbidden
from app.core.settings import Settings
from app.core.storage import Storage
from app.models import ApiKey, Organization

_bearer = HTTPBearer(auto_error=False, description="An API key made by `tunehouse keys create`")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One session per request; routes commit what they change, anything else rolls back.
    It closes when the route returns (scope "function"), before the response is sent: a
    streamed response or a file download holds no database connection. The session connects
    lazily, at its first query, so an upload's body is received before it takes one."""
    session = new_session(settings.sqlalchemy_url)
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_storage(settings: SettingsDep) -> Storage:
    return Storage(settings.storage_root)


StorageDep = Annotated[Storage, Depends(get_storage)]


def get_caller(
    request: Request,
    settings: SettingsDep,
    # Declares the bearer scheme in the OpenAPI document; the guard reads the header itself.
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The caller that RequestGuard authenticated before the body was read (every /v1 route);
    a route outside /v1 that needs a key authenticates here, the same way."""
    caller: Caller | None = getattr(request.state, CALLER_STATE, None)
    if caller is None:
        limiter = limiter_for(request.app, settings)
        caller = authenticate(settings, limiter, request.headers.get("authorization"))
        setattr(request.state, CALLER_STATE, caller)
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_api_key(caller: CallerDep) -> ApiKey:
    """The caller's key: valid, unrevoked and within its rate limit."""
    return caller.key


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]


def get_organization(caller: CallerDep) -> Organization:
    return caller.organization


OrgDep = Annotated[Organization, Depends(get_organization)]


def require_admin_key(key: ApiKeyDep) -> ApiKey:
    if not key.admin:
        raise Forbidden(
            "This route needs an admin API key (`tunehouse keys create --admin`).",
            code="admin_key_required",
        )
    return key


AdminKeyDep = Annotated[ApiKey, Depends(require_admin_key)]
