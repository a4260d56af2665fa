"""/v1/organization/api_keys: an admin key creates, lists and revokes its organization's keys
(after OpenAI's admin API). A key's value is returned once, by the create call."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from app.api.deps import AdminKeyDep, OrgDep, SessionDep
from app.api.presenters import list_response, ts
from app.models import ApiKey
from app.schemas import DeletedResponse, ErrorResponse, ListResponse
from app.services import keys

router = APIRouter(prefix="/organization/api_keys", tags=["api keys"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    403: {"model": ErrorResponse, "description": "The caller's key is not an admin key"},
}
_404: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such key in this organization"}
}


class ApiKeyCreate(BaseModel):
    name: str | None = Field(default=None, max_length=128)
    admin: bool = False


class ApiKeyObject(BaseModel):
    object: Literal["organization.api_key"] = "organization.api_key"
    id: str
    name: str | None
    # The key's first characters and an ellipsis: enough to recognise it, never the key.
    redacted_value: str
    created_at: int
    last_used_at: int | None
    revoked_at: int | None
    admin: bool
    organization_id: str


class NewApiKeyObject(ApiKeyObject):
    # The whole key: in the create response only, and never again.
    value: str


def key_object(record: ApiKey) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "redacted_value": record.prefix + "…",
        "created_at": int(record.created_at.timestamp()),
        "last_used_at": ts(record.last_used_at),
        "revoked_at": ts(record.revoked_at),
        "admin": record.admin,
        "organization_id": record.organization_id,
    }


@router.post("", response_model=NewApiKeyObject, responses=_ERRORS)
def create_api_key(
    body: ApiKeyCreate, _: AdminKeyDep, org: OrgDep, session: SessionDep
) -> NewApiKeyObject:
    new = keys.issue_key(session, org, body.name, admin=body.admin)
    session.commit()
    return NewApiKeyObject(**key_object(new.record), value=new.key)


@router.get("", response_model=ListResponse[ApiKeyObject], responses=_ERRORS)
def list_api_keys(
    _: AdminKeyDep,
    org: OrgDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> ListResponse[ApiKeyObject]:
    rows, more = keys.list_keys(session, org, limit=limit, after=after)
    return list_response([ApiKeyObject(**key_object(r)) for r in rows], more)


@router.get("/{key_id}", response_model=ApiKeyObject, responses={**_ERRORS, **_404})
def retrieve_api_key(key_id: str, _: AdminKeyDep, org: OrgDep, session: SessionDep) -> ApiKeyObject:
    return ApiKeyObject(**key_object(keys.get_key(session, org, key_id)))


@router.delete("/{key_id}", response_model=DeletedResponse, responses={**_ERRORS, **_404})
def revoke_api_key(
    key_id: str, _: AdminKeyDep, org: OrgDep, session: SessionDep
) -> DeletedResponse:
    """Revoke the key: it is refused from the next request on. Revoking twice is harmless."""
    keys.get_key(session, org, key_id)
    keys.revoke_key(session, key_id, org.name)
    session.commit()
    return DeletedResponse(id=key_id, object="organization.api_key.deleted")
