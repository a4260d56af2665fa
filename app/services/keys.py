"""Organizations and API keys. A key is shown once; only its sha256 is stored."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.errors import InvalidRequest, Unauthorized
from app.core.ids import new_id
from app.models import ApiKey, Organization, utcnow

KEY_PREFIX = "sk-th-"
_ORG_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    key: str
    record: ApiKey
    organization: Organization


def get_or_create_organization(session: Session, name: str) -> Organization:
    if not _ORG_NAME.match(name):
        raise InvalidRequest(
            "organization names use lowercase letters, digits, '-' and '_' (at most 64)",
            param="organization",
        )
    org = session.scalar(select(Organization).where(Organization.name == name))
    if org is None:
        org = Organization(id=new_id("org"), name=name)
        session.add(org)
        session.flush()
    return org


def create_key(session: Session, organization: str, name: str | None = None) -> NewKey:
    org = get_or_create_organization(session, organization)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(
        id=new_id("key"), organization_id=org.id, prefix=key[:12], key_hash=hash_key(key), name=name
    )
    session.add(record)
    session.flush()
    return NewKey(key=key, record=record, organization=org)


def any_keys(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).limit(1)) is not None


def authenticate(session: Session, key: str) -> Organization:
    """The organization that owns a valid, unrevoked key; Unauthorized otherwise."""
    digest = hash_key(key)
    record = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if (
        record is None
        or record.revoked_at is not None
        or not hmac.compare_digest(record.key_hash, digest)
    ):
        raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
    org = session.get(Organization, record.organization_id)
    if org is None:  # pragma: no cover - cascade deletes keys with their organization
        raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
    return org


def revoke_key(session: Session, key_id: str) -> bool:
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return bool(result.rowcount)
