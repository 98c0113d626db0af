"""`tokenmill admin <action>`: the operator's commands, run directly on the database `tokenmill serve` uses
(same --data-dir / --database-url; the server may be running). This file is the parser: each action's flags
and the `admin_actions` (or `admin_market_actions`) function it calls; every change lands in `audit-log`.
Refusals are the platform's typed errors, shown by `cli.main` as one line, with nothing written. Amounts are
typed in currency units ("10", "0.5") and stored as exact micros."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import date
from pathlib import Path

from tokenmill.config import default_data_dir, default_database_url
from tokenmill.platform import admin_actions as do
from tokenmill.platform import admin_invite_actions as invites
from tokenmill.platform import admin_market_actions as market
from tokenmill.platform.audit import MAX_ID, MAX_PAGE
from tokenmill.platform.content_owners import platform_owners
from tokenmill.platform.data_controls import sweep
from tokenmill.platform.db import Database
from tokenmill.platform.file_store import local_store
from tokenmill.platform.gateway import PlatformSettings, open_migrated_database
from tokenmill.platform.invites import MAX_USES
from tokenmill.platform.pricing import BPS_PER_UNIT
from tokenmill.platform.tables import LISTING_STATUSES, LISTING_TASKS, LISTING_VISIBILITIES
from tokenmill.platform.validation import MAX_COUNT

Action = Callable[[Database, argparse.Namespace], None]
MAX_DAYS = 100 * 366


def _database(args: argparse.Namespace) -> Database:
    """Migrated first, so the admin CLI works before the first `serve` too."""
    return open_migrated_database(PlatformSettings(data_dir=args.data_dir, database_url=args.database_url))


def _runner(action: Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        db = _database(args)
        try:
            action(db, args)
        finally:
            db.close()
        return 0

    return run


# -- parser --------------------------------------------------------------------------------------------


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date such as 2025-03-01") from None


def _positive(maximum: int) -> Callable[[str], int]:
    """An argparse type: an integer from 1 to `maximum` (bounded, so no date or column can overflow)."""

    def parse(text: str) -> int:
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= maximum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer from 1 to {maximum}")
        return int(text)

    return parse


def _bps(text: str) -> int:
    """An argparse type: basis points from 0 to 10000 (250 = 2.5%)."""
    if not text.isascii() or not text.isdigit() or not 0 <= int(text) <= BPS_PER_UNIT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of basis points from 0 to {BPS_PER_UNIT}")
    return int(text)


def _limit(maximum: int) -> Callable[[str], int | None]:
    """An argparse type for a rate limit: an integer from 1 to `maximum`, or "unlimited" (None)."""
    positive = _positive(maximum)

    def parse(text: str) -> int | None:
        if text == "unlimited":
            return None
        try:
            return positive(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither 'unlimited' nor an integer from 1 to {maximum}"
            ) from None

    return parse


TIER_FLAGS = (
    ("--rpm", "requests_per_minute", "requests per minute on paid models"),
    ("--tpm", "tokens_per_minute", "tokens per minute on paid models"),
    ("--max-concurrent", "max_concurrent_requests", "concurrent requests on paid models"),
    ("--free-rpm", "free_requests_per_minute", "requests per minute on free models"),
    ("--free-tpm", "free_tokens_per_minute", "tokens per minute on free models"),
    ("--free-max-concurrent", "free_max_concurrent_requests", "concurrent requests on free models"),
)
"""set-tier-limits: flag, the `tables.TIER_LIMIT_COLUMNS` name it sets, help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="as for serve (default: $TOKENMILL_DATA_DIR or ~/.tokenmill)",
    )
    common.add_argument(
        "--database-url",
        default=default_database_url(),
        help="as for serve (default: $TOKENMILL_DATABASE_URL or the SQLite file in --data-dir)",
    )
    actions = parser.add_subparsers(dest="admin_action", required=True, metavar="action")

    def action(name: str, help: str, run: Action) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help, description=help, parents=[common])
        sub.set_defaults(run=_runner(run))
        return sub

    sub = action("create-org", "create an organization (it pays for its users' requests)", do.create_org)
    sub.add_argument("name")
    sub.add_argument("--tier", default="default", help="rate-limit tier (see list-tiers; default: default)")
    sub = action("create-user", "create a user in an organization", do.create_user)
    sub.add_argument("org", help="organization id or name")
    sub.add_argument("email")
    sub.add_argument("--name")
    sub = action("create-key", "create an API key for a user; the key is printed once", do.create_key)
    sub.add_argument("user", help="user id or email")
    sub.add_argument("--name", default="")
    sub.add_argument("--model", action="append", help="allow only this model (repeatable; default: all)")
    sub.add_argument(
        "--spend-limit", metavar="AMOUNT", help="most this key may ever spend, in currency units"
    )
    sub.add_argument("--expires-in-days", type=_positive(MAX_DAYS))
    sub.add_argument("--rpm", type=_positive(MAX_COUNT), help="requests per minute (default: the tier's)")
    sub.add_argument("--tpm", type=_positive(MAX_COUNT), help="tokens per minute (default: the tier's)")
    sub.add_argument(
        "--max-concurrent", type=_positive(MAX_COUNT), help="concurrent requests (default: the tier's)"
    )
    sub = action("revoke-key", "revoke an API key; its next request gets 401", do.revoke_key)
    sub.add_argument("key_id")
    sub = action("top-up", "add money to an organization's balance", do.top_up)
    sub.add_argument("org", help="organization id or name")
    sub.add_argument("amount", help="currency units, e.g. 10 or 2.50")
    sub.add_argument(
        "--idempotency-key",
        required=True,
        help="a unique name for this payment: repeating the command with it writes nothing",
    )
    sub.add_argument("--note", default="")
    sub = action("set-price", "set a model's price per 1M tokens (0 0 = free)", do.set_price)
    sub.add_argument("model")
    sub.add_argument("input", help="currency units per 1M prompt tokens")
    sub.add_argument("output", help="currency units per 1M completion tokens")
    sub = action("set-tier", "change an organization's rate-limit tier", do.set_tier)
    sub.add_argument("org")
    sub.add_argument("tier")
    action("list-tiers", "rate-limit tiers: each key's limits on paid and on free models", do.list_tiers)
    sub = action(
        "set-tier-limits",
        "create or change a rate-limit tier; its keys get the new limits from their next request",
        do.set_tier_limits,
    )
    sub.add_argument("tier")
    sub.add_argument(
        "--from",
        dest="copy_from",
        metavar="TIER",
        help="copy the limits not given from TIER (default: the tier's own; a new tier copies default)",
    )
    for flag, dest, what in TIER_FLAGS:
        # SUPPRESS: a flag not given leaves no attribute, so "not given" and "unlimited" (None) differ.
        sub.add_argument(
            flag,
            dest=dest,
            type=_limit(MAX_COUNT),
            default=argparse.SUPPRESS,
            metavar="N|unlimited",
            help=what,
        )
    sub = action(
        "show-limits", "a key's effective rate limits and where each comes from (tier or key)", do.show_limits
    )
    sub.add_argument("key_id")
    sub = action("usage", "usage per UTC day, organization and model", do.usage)
    sub.add_argument("--org", help="one organization (default: all)")
    sub.add_argument("--start-date", type=_day, help="YYYY-MM-DD (default: 29 days before the end date)")
    sub.add_argument("--end-date", type=_day, help="YYYY-MM-DD, inclusive (default: today, UTC)")
    sub.add_argument("--csv", action="store_true", help="CSV with exact integer micros instead of a table")
    action("list-orgs", "organizations with their balances", do.list_orgs)
    sub = action("list-users", "users", do.list_users)
    sub.add_argument("--org")
    sub = action("list-keys", "API keys (never their secrets)", do.list_keys)
    sub.add_argument("--org")
    action("list-prices", "model prices", do.list_prices)
    sub = action(
        "release-reservations", "release reservations a gone gateway left open", do.release_reservations
    )
    sub.add_argument("--gateway-id")
    sub.add_argument("--older-than-minutes", type=_positive(MAX_DAYS * 24 * 60))
    action("rotate-admin-key", "revoke the admin key and print a new one", do.rotate_admin_key)
    _add_market_actions(action)
    _add_invite_actions(action)
    action(
        "sweep-data",
        "delete the files past their expiry or their organization's retention (rows and bytes), and job "
        "artifacts past retention; the server also does this every --data-sweep-interval",
        _sweep_data,
    )
    sub = action(
        "audit-log", "the operator's changes, newest first: who, when, what, before -> after", do.audit_log
    )
    sub.add_argument("--limit", type=_positive(MAX_PAGE), default=50, help="rows to show (default: 50)")
    sub.add_argument("--before-id", type=_positive(MAX_ID), help="the next page: rows older than this id")
    sub.add_argument("--action", help="only this action, e.g. create_key or set_price")
    sub.add_argument("--target", help="only this target: an organization, user or key id, a model, a tier")


def _sweep_data(db: Database, args: argparse.Namespace) -> None:
    """The files in `<data dir>/files` and the fine-tuning artifacts in `<data dir>/fine_tuning`, as `serve`
    keeps them."""
    report = sweep(db, local_store(args.data_dir), owners=platform_owners(db, args.data_dir))
    print(
        f"deleted {report.expired_files} expired file(s) and {report.retained_files} past their "
        "organization's retention"
    )
    for owner, count in sorted(report.owners.items()):
        print(f"deleted {count} {owner} item(s) past retention")


def _add_invite_actions(action: Callable[[str, str, Action], argparse.ArgumentParser]) -> None:
    sub = action(
        "create-invite",
        "make an invite code for sign-up (serve --signup invite); prints it",
        invites.create_invite,
    )
    sub.add_argument(
        "--max-uses", type=_positive(MAX_USES), default=1, help="sign-ups it admits (default: 1)"
    )
    sub.add_argument("--expires-in-days", type=_positive(365), help="default: never (until revoked)")
    sub.add_argument("--note", default="", help="who it is for, say")
    action("list-invites", "invite codes, newest first, with their uses", invites.list_invites)
    sub = action("revoke-invite", "revoke an invite code: no more sign-ups with it", invites.revoke_invite)
    sub.add_argument("invite_id")


def _add_market_actions(action: Callable[[str, str, Action], argparse.ArgumentParser]) -> None:
    action(
        "list-listings",
        "the model square's listings, in every status, with their prices",
        market.list_listings,
    )
    sub = action(
        "set-listing",
        "create or replace a model's listing: it becomes exactly what the flags say",
        market.set_listing,
    )
    sub.add_argument("model")
    sub.add_argument("--task", choices=LISTING_TASKS, help="default: chat")
    sub.add_argument("--display-name", help="default: the model id")
    sub.add_argument("--description")
    sub.add_argument("--provider", metavar="ORG", help="the providing organization (default: the platform)")
    sub.add_argument("--tag", action="append", help="repeatable")
    sub.add_argument("--license")
    sub.add_argument("--context-length", type=_positive(MAX_COUNT))
    free_or_paid = sub.add_mutually_exclusive_group()
    free_or_paid.add_argument("--input", metavar="AMOUNT", help="currency units per 1M prompt tokens")
    free_or_paid.add_argument("--free", action="store_true", help="price 0 and 0")
    sub.add_argument("--output", metavar="AMOUNT", help="currency units per 1M completion tokens")
    sub.add_argument("--visibility", choices=LISTING_VISIBILITIES, help="default: public")
    sub.add_argument(
        "--share-with", metavar="ORG", action="append", help="for --visibility shared; repeatable"
    )
    sub.add_argument(
        "--status", choices=LISTING_STATUSES, help="default: published (a retired listing stays retired)"
    )
    sub.add_argument(
        "--fee-bps",
        dest="platform_fee_bps",
        type=_bps,
        metavar="N",
        help="the platform's share of each sale in basis points (default: the server's)",
    )
    sub = action("publish-listing", "publish a draft or retired listing", market.publish_listing)
    sub.add_argument("model")
    sub = action(
        "retire-listing", "retire a listing: new requests for the model are refused", market.retire_listing
    )
    sub.add_argument("model")
    sub = action(
        "earnings",
        "providers' sales per UTC day and model: their earnings and the platform's fee",
        market.earnings,
    )
    sub.add_argument("--provider", metavar="ORG", help="one provider (default: all)")
    sub.add_argument("--start-date", type=_day, help="YYYY-MM-DD (default: 29 days before the end date)")
    sub.add_argument("--end-date", type=_day, help="YYYY-MM-DD, inclusive (default: today, UTC)")
    sub.add_argument("--csv", action="store_true", help="CSV with exact integer micros instead of a table")
