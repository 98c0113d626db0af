"""The model square's actions of `tokenmill admin`: listings (list, create or replace, publish, retire) and
the providers' earnings report. Changes go through `admin_ops`, so each is in the audit log like the others;
the helpers for tables, dates and CSV are `admin_actions`'."""

from __future__ import annotations

import argparse

from tokenmill.config import ConfigError
from tokenmill.platform import accounts, admin_ops, listings
from tokenmill.platform.admin_actions import cli_actor, print_csv, print_table, report_days
from tokenmill.platform.db import Database
from tokenmill.platform.listing_terms import ListingSpec
from tokenmill.platform.listings import ListingInfo
from tokenmill.platform.money import format_micros, parse_units
from tokenmill.platform.pricing import FREE, Price
from tokenmill.platform.usage import EARNINGS_COLUMNS, provider_earnings

LISTING_HEADERS = (
    "model",
    "provider",
    "task",
    "status",
    "visibility",
    "input_per_1m",
    "output_per_1m",
    "fee",
)
SPEC_FLAGS = (
    "task",
    "display_name",
    "description",
    "provider",
    "license",
    "context_length",
    "visibility",
    "status",
    "platform_fee_bps",
)
"""set-listing flags copied into the `ListingSpec` when given; one not given keeps the spec's default."""


def format_bps(bps: int | None) -> str:
    """250 -> "2.50%" (exact: basis points are hundredths of a percent); None -> the server's default fee."""
    return "default" if bps is None else f"{bps // 100}.{bps % 100:02d}%"


def _listing_row(listing: ListingInfo) -> list[object]:
    return [
        listing.model,
        listing.provider,
        listing.task,
        listing.status,
        listing.visibility,
        format_micros(listing.price.input_micros_per_mtok),
        format_micros(listing.price.output_micros_per_mtok),
        format_bps(listing.platform_fee_bps),
    ]


def list_listings(db: Database, _: argparse.Namespace) -> None:
    print_table(LISTING_HEADERS, [_listing_row(listing) for listing in listings.list_listings(db)])


def _price(args: argparse.Namespace) -> Price | None:
    """--free, or --input with --output; none of them: the spec's default."""
    if args.free:
        if args.output is not None:
            raise ConfigError("output: set-listing takes --free or --input with --output, not both")
        return FREE
    if args.input is None and args.output is None:
        return None
    if args.input is None or args.output is None:
        missing = "input" if args.input is None else "output"
        raise ConfigError(f"{missing}: set-listing needs --input and --output together (or --free)")
    return Price(
        parse_units(args.input, "input", allow_zero=True), parse_units(args.output, "output", allow_zero=True)
    )


def set_listing(db: Database, args: argparse.Namespace) -> None:
    """Create or replace: the listing becomes exactly what the flags say, defaults for the rest."""
    given = {name: getattr(args, name) for name in SPEC_FLAGS if getattr(args, name) is not None}
    if args.tag is not None:
        given["tags"] = tuple(args.tag)
    if args.share_with is not None:
        given["shared_with"] = tuple(args.share_with)
    price = _price(args)
    if price is not None:
        given["price"] = price
    listing = admin_ops.apply_listing(db, cli_actor(), ListingSpec(model=args.model, **given))
    print_table(LISTING_HEADERS, [_listing_row(listing)])


def publish_listing(db: Database, args: argparse.Namespace) -> None:
    listing = admin_ops.set_listing_status(db, cli_actor(), args.model, "published")
    print(f"{listing.model}: {listing.status}")


def retire_listing(db: Database, args: argparse.Namespace) -> None:
    listing = admin_ops.set_listing_status(db, cli_actor(), args.model, "retired")
    print(f"{listing.model}: {listing.status}; new requests for it are refused")


def earnings(db: Database, args: argparse.Namespace) -> None:
    """Sales of each provider's models per UTC day, split into the provider's earnings and the platform's
    fee (sales = earnings + fee on every row)."""
    start, end = report_days(db, args)
    provider_id = None if args.provider is None else accounts.get_organization(db, args.provider).id
    rows = provider_earnings(db, provider_id, start, end)
    if args.csv:
        print_csv(EARNINGS_COLUMNS, rows)
        return
    print_table(
        [
            "day",
            "provider",
            "model",
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "sales",
            "earnings",
            "fee",
        ],
        [
            (
                r.day,
                r.provider_org_id or listings.PLATFORM_PROVIDER,
                r.model,
                r.num_requests,
                r.prompt_tokens,
                r.completion_tokens,
                format_micros(r.sales_micros),
                format_micros(r.earnings_micros),
                format_micros(r.platform_fee_micros),
            )
            for r in rows
        ],
    )
    totals = [
        sum(getattr(r, name) for r in rows)
        for name in ("sales_micros", "earnings_micros", "platform_fee_micros")
    ]
    sales, earned, fee = (format_micros(total) for total in totals)
    print(
        f"total {sum(r.num_requests for r in rows)} requests: sales {sales}, earnings {earned}, fee {fee} "
        f"({start} to {end})"
    )
