"""The actions of `tokenmill admin`, one function each: parsed flags -> one platform call -> printed output
(plain aligned tables, or CSV). `admin_cli.py` builds the parser that dispatches to them."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from tokenmill.config import ConfigError
from tokenmill.platform import accounts, admin_key, keys, ledger, pricing, tiers
from tokenmill.platform.auth import principal_of_key
from tokenmill.platform.billing import recover_open_reservations
from tokenmill.platform.db import Database
from tokenmill.platform.money import format_micros, parse_units
from tokenmill.platform.ratelimit import LIMIT_FIELDS, RateLimits
from tokenmill.platform.tables import TIER_LIMIT_COLUMNS
from tokenmill.platform.usage import USAGE_COLUMNS, usage_report


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%SZ")


def create_org(db: Database, args: argparse.Namespace) -> None:
    org = accounts.create_organization(db, args.name, tier=args.tier)
    print(org.id)


def create_user(db: Database, args: argparse.Namespace) -> None:
    org = accounts.get_organization(db, args.org)
    user = accounts.create_user(db, org.id, args.email, name=args.name or "")
    print(user.id)


def create_key(db: Database, args: argparse.Namespace) -> None:
    user = accounts.get_user(db, args.user)
    expires_at = None
    if args.expires_in_days is not None:
        expires_at = db.now() + timedelta(days=args.expires_in_days)
    created = keys.create_key(
        db,
        user.id,
        name=args.name,
        allowed_models=args.model or None,
        spend_limit_micros=None if args.spend_limit is None else parse_units(args.spend_limit, "spend_limit"),
        expires_at=expires_at,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        max_concurrent_requests=args.max_concurrent,
    )
    print(created.key)
    print(f"key {created.info.id} for {user.email}: shown only this once, store it now", file=sys.stderr)


def revoke_key(db: Database, args: argparse.Namespace) -> None:
    info = keys.revoke_key(db, args.key_id)
    print(f"revoked {info.id} ({info.prefix}...) at {_when(info.revoked_at)}")


def top_up(db: Database, args: argparse.Namespace) -> None:
    org = accounts.get_organization(db, args.org)
    amount = parse_units(args.amount, "amount")
    result = ledger.top_up(db, org.id, amount, idempotency_key=args.idempotency_key, note=args.note)
    done = "topped up" if result.created else "already applied (same idempotency key), nothing written:"
    print(
        f"{done} {org.name} +{format_micros(amount)}; balance {format_micros(ledger.balance_micros(db, org.id))}"
    )


def set_price(db: Database, args: argparse.Namespace) -> None:
    price = pricing.set_model_price(
        db,
        args.model,
        parse_units(args.input, "input", allow_zero=True),
        parse_units(args.output, "output", allow_zero=True),
    )
    print(
        f"{args.model}: input {format_micros(price.input_micros_per_mtok)}, "
        f"output {format_micros(price.output_micros_per_mtok)} per 1M tokens"
    )


def set_tier(db: Database, args: argparse.Namespace) -> None:
    org = accounts.set_organization_tier(db, accounts.get_organization(db, args.org).id, args.tier)
    print(f"{org.name}: tier {org.tier}")


LIMIT_COLUMNS = {
    "requests_per_minute": "rpm",
    "tokens_per_minute": "tpm",
    "max_concurrent_requests": "concurrent",
}
"""A limit's column in the tables below, in the order of `LIMIT_FIELDS`."""
TIER_HEADERS = (
    "tier",
    *LIMIT_COLUMNS.values(),
    *(f"free_{column}" for column in LIMIT_COLUMNS.values()),
    "orgs",
)


def _limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _limits(limits: RateLimits) -> list[str]:
    return [_limit(getattr(limits, name)) for name in LIMIT_FIELDS]


def _tier_rows(infos: Sequence[tiers.TierInfo]) -> list[list[object]]:
    return [
        [t.limits.name, *_limits(t.limits.paid), *_limits(t.limits.free), t.num_organizations] for t in infos
    ]


def list_tiers(db: Database, _: argparse.Namespace) -> None:
    _table(TIER_HEADERS, _tier_rows(tiers.list_tiers(db)))


def set_tier_limits(db: Database, args: argparse.Namespace) -> None:
    changes = {field: getattr(args, field) for field in TIER_LIMIT_COLUMNS if hasattr(args, field)}
    changed = tiers.set_tier_limits(db, args.tier, changes, copy_from=args.copy_from)
    _table(TIER_HEADERS, _tier_rows([t for t in tiers.list_tiers(db) if t.limits.name == changed.name]))


def show_limits(db: Database, args: argparse.Namespace) -> None:
    """Computed by `tiers.effective_limits`, the very function admission applies."""
    principal = principal_of_key(db, args.key_id)
    effective = tiers.effective_limits(db, principal)
    key = f"key {principal.key_id} ({principal.key_prefix}...)"
    print(f"{key}, organization {principal.org_id}, tier {principal.tier}")
    _table(
        ["models", "limit", "value", "from"],
        [
            (models, LIMIT_COLUMNS[name], _limit(getattr(scope.limits, name)), scope.source(name))
            for models, scope in (("paid", effective.paid), ("free", effective.free))
            for name in LIMIT_FIELDS
        ],
    )


def usage(db: Database, args: argparse.Namespace) -> None:
    end = args.end_date or db.now().date()
    start = args.start_date or end - timedelta(days=29)
    org_id = None if args.org is None else accounts.get_organization(db, args.org).id
    rows = usage_report(db, org_id, start, end)
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(USAGE_COLUMNS)
        writer.writerows([getattr(row, column) for column in USAGE_COLUMNS] for row in rows)
        return
    _table(
        ["day", "org", "model", "requests", "prompt_tokens", "completion_tokens", "cost"],
        [
            (
                r.day,
                r.org_id,
                r.model,
                r.num_requests,
                r.prompt_tokens,
                r.completion_tokens,
                format_micros(r.cost_micros),
            )
            for r in rows
        ],
    )
    print(f"total cost {format_micros(sum(r.cost_micros for r in rows))} ({start} to {end})")


def list_orgs(db: Database, _: argparse.Namespace) -> None:
    _table(
        ["id", "name", "tier", "balance", "created"],
        [
            (o.id, o.name, o.tier, format_micros(ledger.balance_micros(db, o.id)), _when(o.created_at))
            for o in accounts.list_organizations(db)
        ],
    )


def list_users(db: Database, args: argparse.Namespace) -> None:
    org_id = None if args.org is None else accounts.get_organization(db, args.org).id
    _table(
        ["id", "org_id", "email", "name", "created"],
        [(u.id, u.org_id, u.email, u.name, _when(u.created_at)) for u in accounts.list_users(db, org_id)],
    )


def list_keys(db: Database, args: argparse.Namespace) -> None:
    orgs = [accounts.get_organization(db, args.org)] if args.org else accounts.list_organizations(db)
    rows = []
    for org in orgs:
        for k in keys.list_keys(db, org.id):
            limit = None if k.spend_limit_micros is None else format_micros(k.spend_limit_micros)
            models = None if k.allowed_models is None else ",".join(k.allowed_models)
            rows.append(
                (
                    k.id,
                    org.name,
                    k.user_id,
                    k.name,
                    f"{k.prefix}...",
                    models,
                    limit,
                    _when(k.created_at),
                    _when(k.expires_at),
                    _when(k.revoked_at),
                )
            )
    _table(
        ["id", "org", "user_id", "name", "prefix", "models", "spend_limit", "created", "expires", "revoked"],
        rows,
    )


def list_prices(db: Database, _: argparse.Namespace) -> None:
    _table(
        ["model", "input_per_1m", "output_per_1m", "free"],
        [
            (
                model,
                format_micros(p.input_micros_per_mtok),
                format_micros(p.output_micros_per_mtok),
                "yes" if p.is_free else "",
            )
            for model, p in pricing.list_model_prices(db).items()
        ],
    )


def release_reservations(db: Database, args: argparse.Namespace) -> None:
    """For a gateway that will not come back (its own restart releases its reservations by itself)."""
    if args.gateway_id is None and args.older_than_minutes is None:
        raise ConfigError("release-reservations: give --gateway-id and/or --older-than-minutes")
    before = None
    if args.older_than_minutes is not None:
        before = datetime.now(UTC) - timedelta(minutes=args.older_than_minutes)
    released = recover_open_reservations(db, owner=args.gateway_id, opened_before=before)
    print(f"released {len(released)} open reservation(s); nothing was charged for them")


def rotate_admin_key(db: Database, args: argparse.Namespace) -> None:
    print(admin_key.rotate_admin_key(db, args.data_dir))
