"""Organizations (who pays) and their users (who holds keys): creation, lookup, listing."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError

from tokenmill.platform.db import Database
from tokenmill.platform.errors import DuplicateName, InvalidArgument, UnknownOrganization, UnknownUser
from tokenmill.platform.tables import Organization, User, new_id
from tokenmill.platform.tiers import DEFAULT_TIER, require_tier, tier_name
from tokenmill.platform.validation import text

_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")


@dataclass(frozen=True, slots=True)
class OrgInfo:
    id: str
    name: str
    tier: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class UserInfo:
    id: str
    org_id: str
    email: str
    name: str
    created_at: datetime


def _org_info(row: Organization) -> OrgInfo:
    return OrgInfo(id=row.id, name=row.name, tier=row.tier, created_at=row.created_at)


def _user_info(row: User) -> UserInfo:
    return UserInfo(id=row.id, org_id=row.org_id, email=row.email, name=row.name, created_at=row.created_at)


def create_organization(db: Database, name: str, tier: str = DEFAULT_TIER) -> OrgInfo:
    """`tier` must be an existing rate-limit tier (`tiers.list_tiers`)."""
    name = text("name", name, max_len=200)
    tier = tier_name(tier)
    with db.write() as session:
        require_tier(session, tier)
        if session.scalar(select(Organization.id).where(Organization.name == name)) is not None:
            raise DuplicateName(f"name: an organization named {name!r} already exists")
        row = Organization(id=new_id("org"), name=name, tier=tier, created_at=db.now())
        session.add(row)
        try:
            session.flush()
        except IntegrityError as exc:  # lost a race with another process creating the same name
            raise DuplicateName(f"name: an organization named {name!r} already exists") from exc
        return _org_info(row)


def set_organization_tier(db: Database, org_id: str, tier: str) -> OrgInfo:
    """Moves the organization to an existing tier; its keys get the tier's limits from their next request."""
    tier = tier_name(tier)
    with db.write() as session:
        row = session.get(Organization, org_id)
        if row is None:
            raise UnknownOrganization(f"org_id: no organization {org_id!r}")
        require_tier(session, tier)
        row.tier = tier
        return _org_info(row)


def get_organization(db: Database, ref: str) -> OrgInfo:
    """By id or by name (the admin CLI accepts either)."""
    ref = text("organization", ref, max_len=200)
    with db.read() as session:
        row = session.scalar(
            select(Organization).where(or_(Organization.id == ref, Organization.name == ref))
        )
        if row is None:
            raise UnknownOrganization(f"organization: no organization {ref!r}")
        return _org_info(row)


def list_organizations(db: Database) -> list[OrgInfo]:
    with db.read() as session:
        return [_org_info(r) for r in session.scalars(select(Organization).order_by(Organization.name))]


def create_user(db: Database, org_id: str, email: str, name: str = "") -> UserInfo:
    email = text("email", email, max_len=320).lower()
    if not _EMAIL_RE.match(email):
        raise InvalidArgument(f"email: {email!r} is not an email address")
    name = text("name", name, max_len=200, allow_empty=True)
    with db.write() as session:
        if session.get(Organization, org_id) is None:
            raise UnknownOrganization(f"org_id: no organization {org_id!r}")
        if session.scalar(select(User.id).where(User.email == email)) is not None:
            raise DuplicateName(f"email: a user with email {email!r} already exists")
        row = User(id=new_id("user"), org_id=org_id, email=email, name=name or email, created_at=db.now())
        session.add(row)
        try:
            session.flush()
        except IntegrityError as exc:
            raise DuplicateName(f"email: a user with email {email!r} already exists") from exc
        return _user_info(row)


def get_user(db: Database, ref: str) -> UserInfo:
    """By id or by email."""
    ref = text("user", ref, max_len=320)
    with db.read() as session:
        row = session.scalar(select(User).where(or_(User.id == ref, User.email == ref.lower())))
        if row is None:
            raise UnknownUser(f"user: no user {ref!r}")
        return _user_info(row)


def list_users(db: Database, org_id: str | None = None) -> list[UserInfo]:
    query = select(User).order_by(User.email)
    if org_id is not None:
        query = query.where(User.org_id == org_id)
    with db.read() as session:
        return [_user_info(r) for r in session.scalars(query)]
