"""Route dependencies: every need of a route is one Annotated alias."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.api.ratelimit import limiter_for
from app.core.db import new_session
from app.core.errors import Forbidden, Unauthorized
from app.core.settings import Settings
from app.core.storage import Storage
from app.models import ApiKey, Organization
from app.services import keys

_bearer = HTTPBearer(auto_error=False, description="An API key made by `tunehouse keys create`")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One session per request; routes commit what they change, anything else rolls back."""
    session = new_session(settings.sqlalchemy_url)
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_storage(settings: SettingsDep) -> Storage:
    return Storage(settings.storage_root)


StorageDep = Annotated[Storage, Depends(get_storage)]


def get_api_key(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The caller's key: valid, unrevoked and within its rate limit."""
    if credentials is None or not credentials.credentials:
        raise Unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    record = keys.authenticate(session, credentials.credentials)
    limiter = limiter_for(request.app, settings)
    if limiter is not None:
        limiter.check(record.id)
    if keys.touch_last_used(session, record):
        session.commit()
    return record


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]


def get_organization(session: SessionDep, key: ApiKeyDep) -> Organization:
    return keys.organization_of(session, key)


OrgDep = Annotated[Organization, Depends(get_organization)]


def require_admin_key(key: ApiKeyDep) -> ApiKey:
    if not key.admin:
        raise Forbidden(
            "This route needs an admin API key (`tunehouse keys create --admin`).",
            code="admin_key_required",
        )
    return key


AdminKeyDep = Annotated[ApiKey, Depends(require_admin_key)]
