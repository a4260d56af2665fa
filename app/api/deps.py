"""Route dependencies: every need of a route is one Annotated alias."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.db import new_session
from app.core.errors import Unauthorized
from app.core.settings import Settings
from app.core.storage import Storage
from app.models import Organization
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


def get_organization(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Organization:
    if credentials is None or not credentials.credentials:
        raise Unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    return keys.authenticate(session, credentials.credentials)


OrgDep = Annotated[Organization, Depends(get_organization)]
