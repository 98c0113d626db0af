"""The actions of `tokenmill admin`, one function each: parsed flags -> one platform call -> printed output
(plain aligned tables, or CSV). Changes go through `admin_ops`, as the HTTP admin API's do, so each one is in
the audit log under `cli:<user>`. `admin_cli.py` builds the parser that dispatches to them; the model
square's actions are in `admin_market_actions.py`."""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import os
import sys
from collections.abc import Sequence
from datetime import date, datetime, timedelta

from tokenmill.config import ConfigError
from tokenmill.platform import accounts, admin_ops, audit, keys, ledger, pricing, tiers
from tokenmill.platform.auth import principal_of_key
from tokenmill.platform.db import Database
from tokenmill.platform.money import format_micros, parse_units
from tokenmill.platform.ratelimit import LIMIT_FIELDS, RateLimits
from tokenmill.platform.tables import TIER_LIMIT_COLUMNS
from tokenmill.platform.usage import USAGE_COLUMNS, usage_report
from tokenmill.text import printable

MAX_ACTOR_USER_CHARS = 100
"""Room for `cli:` and any login name within the audit log's actor column."""
TIMESTAMP_FIELDS = ("created_at", "updated_at")
"""audit-log: left out of a row's change, which its `when` column dates."""
MAX_SHOWN_CHARS = 60
"""audit-log: a value longer than this (a description, a long list) is cut, so each row stays one line."""


def cli_actor() -> str:
    """The audit log's "who" for a change made here: `cli:` and the operating-system user. A process with no
    login name (a container's bare uid) or an unprintable one is still named, never refused."""
    try:
        user = printable(getpass.getuser()).replace("\x00", "").strip()
    except (OSError, KeyError, ImportError):  # getuser: no LOGNAME/USER and no passwd entry for the uid
        user = ""
    if not user and hasattr(os, "getuid"):
        user = f"uid-{os.getuid()}"
    return f"cli:{user[:MAX_ACTOR_USER_CHARS] or 'unknown'}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def format_when(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%SZ")


def create_org(db: Database, args: argparse.Namespace) -> None:
    org = admin_ops.create_org(db, cli_actor(), args.name, tier=args.tier)
    print(org.id)


def create_user(db: Database, args: argparse.Namespace) -> None:
    user = admin_ops.create_user(db, cli_actor(), args.org, args.email, name=args.name or "")
    print(user.id)


def create_key(db: Database, args: argparse.Namespace) -> None:
    expires_at = None
    if args.expires_in_days is not None:
        expires_at = db.now() + timedelta(days=args.expires_in_days)
    created = admin_ops.create_key(
        db,
        cli_actor(),
        args.user,
        name=args.name,
        allowed_models=args.model or None,
        spend_limit_micros=None if args.spend_limit is None else parse_units(args.spend_limit, "spend_limit"),
        expires_at=expires_at,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        max_concurrent_requests=args.max_concurrent,
    )
    user = accounts.get_user(db, created.info.user_id)
    print(created.key)
    print(f"key {created.info.id} for {user.email}: shown only this once, store it now", file=sys.stderr)


def revoke_key(db: Database, args: argparse.Namespace) -> None:
    info = admin_ops.revoke_key(db, cli_actor(), args.key_id)
    print(f"revoked {info.id} ({info.prefix}...) at {format_when(info.revoked_at)}")


def top_up(db: Database, args: argparse.Namespace) -> None:
    amount = parse_units(args.amount, "amount")
    result = admin_ops.top_up(
        db, cli_actor(), args.org, amount, idempotency_key=args.idempotency_key, note=args.note
    )
    org = accounts.get_organization(db, result.entry.org_id)
    done = "topped up" if result.created else "already applied (same idempotency key), nothing written:"
    print(
        f"{done} {org.name} +{format_micros(amount)}; balance {format_micros(ledger.balance_micros(db, org.id))}"
    )


def set_price(db: Database, args: argparse.Namespace) -> None:
    price = admin_ops.set_price(
        db,
        cli_actor(),
        args.model,
        parse_units(args.input, "input", allow_zero=True),
        parse_units(args.output, "output", allow_zero=True),
    )
    print(
        f"{args.model}: input {format_micros(price.input_micros_per_mtok)}, "
        f"output {format_micros(price.output_micros_per_mtok)} per 1M tokens"
    )


def set_tier(db: Database, args: argparse.Namespace) -> None:
    org = admin_ops.set_org_tier(db, cli_actor(), args.org, args.tier)
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
    print_table(TIER_HEADERS, _tier_rows(tiers.list_tiers(db)))


def set_tier_limits(db: Database, args: argparse.Namespace) -> None:
    changes = {field: getattr(args, field) for field in TIER_LIMIT_COLUMNS if hasattr(args, field)}
    changed = admin_ops.set_tier_limits(db, cli_actor(), args.tier, changes, copy_from=args.copy_from)
    print_table(TIER_HEADERS, _tier_rows([t for t in tiers.list_tiers(db) if t.limits.name == changed.name]))


def show_limits(db: Database, args: argparse.Namespace) -> None:
    """Computed by `tiers.effective_limits`, the very function admission applies."""
    principal = principal_of_key(db, args.key_id)
    effective = tiers.effective_limits(db, principal)
    key = f"key {principal.key_id} ({principal.key_prefix}...)"
    print(f"{key}, organization {principal.org_id}, tier {principal.tier}")
    print_table(
        ["models", "limit", "value", "from"],
        [
            (models, LIMIT_COLUMNS[name], _limit(getattr(scope.limits, name)), scope.source(name))
            for models, scope in (("paid", effective.paid), ("free", effective.free))
            for name in LIMIT_FIELDS
        ],
    )


def report_days(db: Database, args: argparse.Namespace) -> tuple[date, date]:
    """--start-date/--end-date of a report, inclusive: by default the 30 UTC days ending today."""
    end = args.end_date or db.now().date()
    return args.start_date or end - timedelta(days=29), end


def print_csv(columns: Sequence[str], rows: Sequence[object]) -> None:
    """One row per record, a column per attribute: exact integers (micros), for programs."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([getattr(row, column) for column in columns] for row in rows)


def usage(db: Database, args: argparse.Namespace) -> None:
    start, end = report_days(db, args)
    org_id = None if args.org is None else accounts.get_organization(db, args.org).id
    rows = usage_report(db, org_id, start, end)
    if args.csv:
        print_csv(USAGE_COLUMNS, rows)
        return
    print_table(
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
    print_table(
        ["id", "name", "tier", "balance", "created"],
        [
            (o.id, o.name, o.tier, format_micros(ledger.balance_micros(db, o.id)), format_when(o.created_at))
            for o in accounts.list_organizations(db)
        ],
    )


def list_users(db: Database, args: argparse.Namespace) -> None:
    org_id = None if args.org is None else accounts.get_organization(db, args.org).id
    print_table(
        ["id", "org_id", "email", "name", "created"],
        [
            (u.id, u.org_id, u.email, u.name, format_when(u.created_at))
            for u in accounts.list_users(db, org_id)
        ],
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
                    format_when(k.created_at),
                    format_when(k.expires_at),
                    format_when(k.revoked_at),
                )
            )
    print_table(
        ["id", "org", "user_id", "name", "prefix", "models", "spend_limit", "created", "expires", "revoked"],
        rows,
    )


def list_prices(db: Database, _: argparse.Namespace) -> None:
    print_table(
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
    older_than = None if args.older_than_minutes is None else timedelta(minutes=args.older_than_minutes)
    released = admin_ops.release_reservations(
        db, cli_actor(), gateway_id=args.gateway_id, older_than=older_than
    )
    print(f"released {len(released)} open reservation(s); nothing was charged for them")


def rotate_admin_key(db: Database, args: argparse.Namespace) -> None:
    print(admin_ops.rotate_admin_key(db, cli_actor(), args.data_dir))


def audit_log(db: Database, args: argparse.Namespace) -> None:
    entries = audit.list_audit(
        db, limit=args.limit, before_id=args.before_id, action=args.action, target=args.target
    )
    print_table(
        ["id", "when", "actor", "action", "target", "change"],
        [
            (e.id, format_when(e.created_at), e.actor, e.action, e.target, describe_change(e.before, e.after))
            for e in entries
        ],
    )


def describe_change(before: object, after: object) -> str:
    """One line for a table cell: a creation as `new: field=value; ...`, a change as the fields that differ,
    `field: before -> after` (a field only after it, as `field=value`). Nested records are flattened
    (`paid.requests_per_minute`), and their own timestamps left out: the `when` column says it."""
    if before is None and isinstance(after, dict):
        return "new: " + "; ".join(f"{name}={_compact(value)}" for name, value in _fields(after).items())
    if isinstance(before, dict) and isinstance(after, dict):
        old, new = _fields(before), _fields(after)
        changed = [
            _difference(name, old, new)
            for name in sorted(old.keys() | new.keys())
            if name not in old or name not in new or old[name] != new[name]
        ]
        return "; ".join(changed) or "(no change)"
    return f"{_compact(before)} -> {_compact(after)}"


def _difference(name: str, old: dict[str, object], new: dict[str, object]) -> str:
    if name not in old:
        return f"{name}={_compact(new[name])}"
    return f"{name}: {_compact(old[name])} -> {_compact(new.get(name))}"


def _fields(record: dict[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for name, value in record.items():
        if name in TIMESTAMP_FIELDS:
            continue
        if isinstance(value, dict):
            flat |= _fields(value, f"{prefix}{name}.")
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _compact(value: object) -> str:
    shown = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return shown if len(shown) <= MAX_SHOWN_CHARS else shown[: MAX_SHOWN_CHARS - 3] + "..."
