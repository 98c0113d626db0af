"""Rate-limit tiers as data: the rows of `rate_limit_tiers`, which the operator lists and changes (`tokenmill
admin list-tiers | set-tier-limits`) and `authenticate` joins onto every key, so a change applies from the
next request. The rule combining a tier with a key's overrides is `ratelimit.resolve_scope`;
`effective_limits` applies it exactly as admission does."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tokenmill.platform.db import Database
from tokenmill.platform.errors import Conflict, InvalidArgument, UnknownTier
from tokenmill.platform.ratelimit import LIMIT_FIELDS, EffectiveLimits, RateLimits, TierLimits, resolve_scope
from tokenmill.platform.tables import TIER_LIMIT_COLUMNS, Organization, RateLimitTier
from tokenmill.platform.validation import MAX_COUNT, optional_int

if TYPE_CHECKING:
    from tokenmill.platform.principal import KeyPrincipal

DEFAULT_TIER = "default"
"""New organizations' tier, and the one a new tier copies its limits from unless told otherwise."""
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass(frozen=True, slots=True)
class TierInfo:
    limits: TierLimits
    num_organizations: int


def tier_name(name: object, field: str = "tier") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(f"{field}: lowercase letters, digits, '-' or '_', at most 32 characters")
    return name


def tier_limits(row: RateLimitTier) -> TierLimits:
    return TierLimits(
        name=row.name,
        paid=RateLimits(*(getattr(row, name) for name in LIMIT_FIELDS)),
        free=RateLimits(*(getattr(row, f"free_{name}") for name in LIMIT_FIELDS)),
    )


def require_tier(session: Session, name: str, field: str = "tier") -> RateLimitTier:
    """The row of tier `name`, inside the caller's transaction; an unknown name is an `UnknownTier` that
    lists the tiers there are (writes that refer to a tier call this, as no foreign key checks them)."""
    row = session.get(RateLimitTier, tier_name(name, field))
    if row is None:
        names = ", ".join(session.scalars(select(RateLimitTier.name).order_by(RateLimitTier.name)))
        raise UnknownTier(f"{field}: no rate-limit tier {name!r}; the tiers are: {names}")
    return row


def get_tier(db: Database, name: str) -> TierLimits:
    with db.read() as session:
        return tier_limits(require_tier(session, name))


def list_tiers(db: Database) -> list[TierInfo]:
    """Every tier with the number of organizations on it, by name."""
    num_orgs = func.count(Organization.id)
    query = (
        select(RateLimitTier, num_orgs)
        .outerjoin(Organization, Organization.tier == RateLimitTier.name)
        .group_by(RateLimitTier.name)
        .order_by(RateLimitTier.name)
    )
    with db.read() as session:
        return [TierInfo(tier_limits(row), int(count)) for row, count in session.execute(query).all()]


def set_tier_limits(
    db: Database, name: str, changes: Mapping[str, int | None], *, copy_from: str | None = None
) -> TierLimits:
    """Create or change tier `name`: each limit in `changes` (of `TIER_LIMIT_COLUMNS`; None = unlimited) is set,
    every other one comes from `copy_from` if given, else stays as it is (a new tier copies `default`).
    Organizations on the tier are held to the new limits from their next request."""
    name = tier_name(name)
    unknown = sorted(set(changes) - set(TIER_LIMIT_COLUMNS))
    if unknown:
        raise InvalidArgument(
            f"changes: unknown limit {unknown[0]!r}; the limits are {', '.join(TIER_LIMIT_COLUMNS)}"
        )
    checked = {
        field: optional_int(field, value, minimum=1, maximum=MAX_COUNT) for field, value in changes.items()
    }
    with db.write() as session:
        row = session.get(RateLimitTier, name)
        if copy_from is not None:
            base = require_tier(session, copy_from, "from")
        else:
            base = row or require_tier(session, DEFAULT_TIER, "from")
        values = {field: getattr(base, field) for field in TIER_LIMIT_COLUMNS} | checked
        if row is None:
            row = RateLimitTier(name=name, **values, updated_at=db.now())
            session.add(row)
            try:
                session.flush()
            except IntegrityError as exc:  # another admin created it between our read and our insert
                raise Conflict(f"tier: {name!r} was created meanwhile; run the command again") from exc
        else:
            for field, value in values.items():
                setattr(row, field, value)
            row.updated_at = db.now()
        return tier_limits(row)


def effective_limits(db: Database, principal: KeyPrincipal) -> EffectiveLimits:
    """What `AdmissionControl.admit` holds this key to, on paid and on free models, and where each limit
    comes from: for `tokenmill admin show-limits` and `GET /v1/user/info`. Uses the tier `authenticate`
    joined onto the principal (no query); reads it only for a principal built some other way."""
    tier = principal_tier(db, principal)
    return EffectiveLimits(
        paid=resolve_scope(principal.key_id, tier, principal.overrides, free_model=False),
        free=resolve_scope(principal.key_id, tier, principal.overrides, free_model=True),
    )


def principal_tier(db: Database, principal: KeyPrincipal) -> TierLimits:
    """The tier `authenticate` joined onto the principal (no query), or read for one built otherwise."""
    return principal.tier_limits or get_tier(db, principal.tier)
