"""Read models for the user API and the admin report: the caller's account summary (`user_info`), usage per
day and model (`usage_report`), and a provider's sales and earnings per day and model (`provider_earnings`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import date

from sqlalchemy import func, select

from tokenmill.platform.billing import held_micros, key_committed_micros
from tokenmill.platform.db import Database
from tokenmill.platform.errors import InvalidArgument, UnknownOrganization
from tokenmill.platform.ledger import sum_balance
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.platform.tables import Organization, UsageRecord, User


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """`GET /v1/user/info`: who the key belongs to and what the organization can spend."""

    org_id: str
    org_name: str
    tier: str
    user_id: str
    user_email: str
    user_name: str
    key_id: str
    key_prefix: str
    balance_micros: int
    """Sum of the ledger."""
    held_micros: int
    """Held by requests in flight."""
    available_micros: int
    """balance - held: what the next request may reserve."""
    key_spend_limit_micros: int | None
    key_committed_micros: int
    """Spent plus held by this key; capped by its spend limit."""


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One line of the usage report: one organization, one model, one UTC day."""

    day: date
    org_id: str
    model: str
    num_requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int


USAGE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRow))
"""Column order for tables and CSV."""


@dataclass(frozen=True, slots=True)
class EarningsRow:
    """One line of the earnings report: one provider, one of its models, one UTC day."""

    day: date
    provider_org_id: str
    model: str
    num_requests: int
    prompt_tokens: int
    completion_tokens: int
    sales_micros: int
    """What buyers were charged: earnings_micros + platform_fee_micros, exactly."""
    earnings_micros: int
    """Credited to the provider (its `earning` ledger entries)."""
    platform_fee_micros: int


EARNINGS_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(EarningsRow))
"""Column order for tables and CSV."""


def user_info(db: Database, principal: KeyPrincipal) -> AccountInfo:
    with db.read() as session:
        found = session.execute(
            select(Organization, User)
            .join(User, User.org_id == Organization.id)
            .where(Organization.id == principal.org_id, User.id == principal.user_id)
        ).first()
        if found is None:
            raise UnknownOrganization(f"org_id: no organization {principal.org_id!r}")
        org, user = found[0], found[1]
        balance = sum_balance(session, org.id)
        held = held_micros(session, org.id)
        committed = key_committed_micros(session, principal.key_id)
    return AccountInfo(
        org_id=org.id,
        org_name=org.name,
        tier=org.tier,
        user_id=user.id,
        user_email=user.email,
        user_name=user.name,
        key_id=principal.key_id,
        key_prefix=principal.key_prefix,
        balance_micros=balance,
        held_micros=held,
        available_micros=balance - held,
        key_spend_limit_micros=principal.spend_limit_micros,
        key_committed_micros=committed,
    )


def usage_report(db: Database, org_id: str | None, start_date: date, end_date: date) -> list[UsageRow]:
    """Usage grouped by day and model, both dates inclusive (UTC days). `org_id=None` reports every
    organization (admin); the user API always passes the caller's organization."""
    if start_date > end_date:
        raise InvalidArgument("start_date: must not be after end_date")
    query = (
        select(
            UsageRecord.day,
            UsageRecord.org_id,
            UsageRecord.model,
            func.count(UsageRecord.id),
            func.sum(UsageRecord.prompt_tokens),
            func.sum(UsageRecord.completion_tokens),
            func.sum(UsageRecord.cost_micros),
        )
        .where(UsageRecord.day >= start_date, UsageRecord.day <= end_date)
        .group_by(UsageRecord.day, UsageRecord.org_id, UsageRecord.model)
        .order_by(UsageRecord.day, UsageRecord.org_id, UsageRecord.model)
    )
    if org_id is not None:
        query = query.where(UsageRecord.org_id == org_id)
    with db.read() as session:
        rows = session.execute(query).all()
    return [
        UsageRow(
            day=day,
            org_id=org,
            model=model,
            num_requests=int(n),
            prompt_tokens=int(p),
            completion_tokens=int(c),
            cost_micros=int(cost),
        )
        for day, org, model, n, p, c, cost in rows
    ]


def provider_earnings(db: Database, provider_org_id: str | None, start: date, end: date) -> list[EarningsRow]:
    """Sales of providers' models grouped by day, provider and model, both dates inclusive (UTC days).
    `provider_org_id=None` reports every provider (the operator); a provider's own API passes its
    organization. The platform's own models are not in it: they have no provider."""
    if start > end:
        raise InvalidArgument("start: must not be after end")
    query = (
        select(
            UsageRecord.day,
            UsageRecord.provider_org_id,
            UsageRecord.model,
            func.count(UsageRecord.id),
            func.sum(UsageRecord.prompt_tokens),
            func.sum(UsageRecord.completion_tokens),
            func.sum(UsageRecord.cost_micros),
            func.sum(UsageRecord.provider_micros),
            func.sum(UsageRecord.platform_fee_micros),
        )
        .where(UsageRecord.day >= start, UsageRecord.day <= end, UsageRecord.provider_org_id.is_not(None))
        .group_by(UsageRecord.day, UsageRecord.provider_org_id, UsageRecord.model)
        .order_by(UsageRecord.day, UsageRecord.provider_org_id, UsageRecord.model)
    )
    if provider_org_id is not None:
        query = query.where(UsageRecord.provider_org_id == provider_org_id)
    with db.read() as session:
        rows = session.execute(query).all()
    return [
        EarningsRow(
            day=day,
            provider_org_id=provider,
            model=model,
            num_requests=int(n),
            prompt_tokens=int(p),
            completion_tokens=int(c),
            sales_micros=int(sales),
            earnings_micros=int(earned),
            platform_fee_micros=int(fee),
        )
        for day, provider, model, n, p, c, sales, earned, fee in rows
    ]
