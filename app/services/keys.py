"""Organizations and API keys. A key is shown once; only its sha256 is stored."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.errors import InvalidRequest, NotFound, Unauthorized
from app.core.ids import new_id
from app.models import ApiKey, Organization, utcnow
from app.services.pagination import page
from app.services.rowcount import rowcount

# Keys are logged by id only, never by value.
log = logging.getLogger("tunehouse.keys")

KEY_PREFIX = "sk-th-"
# Shown in listings to tell keys apart: "sk-th-" and 6 random characters (36 bits).
PREFIX_LENGTH = 12
# last_used_at is written at most this often per key, not on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)
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


def create_key(
    session: Session, organization: str, name: str | None = None, *, admin: bool = False
) -> NewKey:
    return issue_key(session, get_or_create_organization(session, organization), name, admin=admin)


def issue_key(
    session: Session, org: Organization, name: str | None = None, *, admin: bool = False
) -> NewKey:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(
        id=new_id("key"),
        organization_id=org.id,
        prefix=key[:PREFIX_LENGTH],
        key_hash=hash_key(key),
        name=name,
        admin=admin,
    )
    session.add(record)
    session.flush()
    log.info(
        "created %s %s for organization %s", "admin key" if admin else "key", record.id, org.id
    )
    return NewKey(key=key, record=record, organization=org)


def any_keys(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).limit(1)) is not None


def authenticate(session: Session, key: str) -> ApiKey:
    """The valid, unrevoked key record for ``key``; Unauthorized otherwise. A revoked key is
    refused from the next request on: nothing is cached."""
    digest = hash_key(key)
    record = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if (
        record is None
        or record.revoked_at is not None
        or not hmac.compare_digest(record.key_hash, digest)
    ):
        raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
    return record


def organization_of(session: Session, record: ApiKey) -> Organization:
    org = session.get(Organization, record.organization_id)
    if org is None:  # pragma: no cover - cascade deletes keys with their organization
        raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
    return org


def touch_last_used(session: Session, record: ApiKey) -> bool:
    """Record that the key was used now, at most once per LAST_USED_RESOLUTION (a conditional
    UPDATE, so concurrent requests write once), and only when the key's row says it is due.
    True when the row changed."""
    now = utcnow()
    stale = now - LAST_USED_RESOLUTION
    if record.last_used_at is not None and record.last_used_at >= stale:
        # The row just read is recent enough: no write statement, which on SQLite would take
        # the database's one write lock on every request.
        return False
    result = session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == record.id,
            (ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < stale),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(rowcount(result))


def list_keys(
    session: Session, org: Organization, *, limit: int, after: str | None
) -> tuple[Sequence[ApiKey], bool]:
    """The organization's keys, revoked ones included, newest first."""
    stmt = select(ApiKey).where(ApiKey.organization_id == org.id)
    cursor = get_key(session, org, after) if after else None
    return page(
        session, stmt, sort=ApiKey.created_at, tiebreak=ApiKey.id, after=cursor, limit=limit
    )


def get_key(session: Session, org: Organization, key_id: str) -> ApiKey:
    record = session.scalar(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.organization_id == org.id)
    )
    if record is None:
        raise NotFound(f"No API key with id '{key_id}' was found.", param="key_id")
    return record


def revoke_key(session: Session, key_id: str, organization: str | None = None) -> bool:
    """Revoke a key by id (only within ``organization``, a name, when given). False when no
    such unrevoked key exists."""
    stmt = update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
    if organization is not None:
        org_id = select(Organization.id).where(Organization.name == organization)
        stmt = stmt.where(ApiKey.organization_id.in_(org_id.scalar_subquery()))
    result = session.execute(
        stmt.values(revoked_at=utcnow()).execution_options(synchronize_session=False)
    )
    revoked = bool(rowcount(result))
    if revoked:
        log.info("revoked key %s", key_id)
    return revoked
