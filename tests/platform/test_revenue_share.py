"""Revenue share, checked against exact rational arithmetic: every sale of a provider's model charges the
buyer and credits the provider its share in one transaction, the two parts add up to the charge to the
micro, the provider is never paid more than its exact share nor less by a whole micro, the reports agree
with the ledger, and two organizations buying each other's models at once neither deadlock nor lose a
micro."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from fractions import Fraction

import pytest
from sqlalchemy import select

from tests.platform.helpers import FakeClock, FakeDateTime, make_account, reopen, unique
from tokenmill.platform.admission import AdmissionControl
from tokenmill.platform.billing import UsageInfo, UsageStatus, reserve, settle
from tokenmill.platform.db import Database
from tokenmill.platform.errors import InvalidArgument
from tokenmill.platform.ledger import balance_micros, list_entries
from tokenmill.platform.listing_terms import ListingSpec
from tokenmill.platform.listings import ListingInfo, apply_listing, get_listing
from tokenmill.platform.pricing import Price, revenue_split
from tokenmill.platform.ratelimit_memory import InMemoryRateLimiter
from tokenmill.platform.tables import LedgerEntry
from tokenmill.platform.tables import Reservation as ReservationRow
from tokenmill.platform.usage import provider_earnings

FEES_BPS = [0, 1, 3333, 9999, 10_000]
AWKWARD_PRICES = [0, 7, 13, 999_999, 1_000_001, 3_333_333, 123_456_789, 10**12 - 1]


def _exact_cost(prompt_tokens: int, completion_tokens: int, price: Price) -> Fraction:
    return Fraction(
        prompt_tokens * price.input_micros_per_mtok + completion_tokens * price.output_micros_per_mtok,
        1_000_000,
    )


def _check_split(cost: int, fee_bps: int, provider_micros: int, platform_fee_micros: int) -> None:
    exact_share = Fraction(cost * (10_000 - fee_bps), 10_000)
    assert provider_micros + platform_fee_micros == cost
    assert 0 <= exact_share - provider_micros < 1  # never more than the exact share, never a micro less
    assert provider_micros >= 0 and platform_fee_micros >= 0


def test_revenue_split_follows_the_rounding_rule() -> None:
    rng = random.Random(7)
    costs = [*range(0, 2_001), 10**15, 10**15 - 1, *(rng.randrange(10**13) for _ in range(2_000))]
    for fee in [*FEES_BPS, 2000, 5000, 7, 6667]:
        for cost in costs:
            _check_split(cost, fee, *revenue_split(cost, fee))
    assert revenue_split(100, 3333) == (66, 34)  # exact share 66.67: the provider gets 66
    assert revenue_split(1, 9999) == (0, 1) and revenue_split(1, 0) == (1, 0)
    assert revenue_split(10, 10_000) == (0, 10)
    for cost, fee in [(-1, 0), (1, -1), (1, 10_001), (1.0, 0), (1, 0.5)]:
        with pytest.raises(InvalidArgument):
            revenue_split(cost, fee)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Sale:
    listing: ListingInfo
    fee_bps: int
    usage: UsageInfo


def _sell(
    db: Database, buyer: object, listing: ListingInfo, fee_bps: int, rng: random.Random, status: UsageStatus
) -> Sale:
    principal = buyer.principal  # type: ignore[attr-defined]
    prompt_tokens, max_tokens = rng.randint(0, 5_000), rng.randint(0, 5_000)
    held = reserve(db, principal, listing, prompt_tokens, max_tokens, fee_bps=fee_bps)
    completion_tokens = rng.randint(0, max_tokens)
    usage = settle(db, held, prompt_tokens, completion_tokens, status, latency_s=0.01)
    return Sale(listing, fee_bps, usage)


def test_hundreds_of_sales_split_exactly_and_reconcile_with_ledger_and_reports(db: Database) -> None:
    clock = FakeDateTime()
    timed = reopen(db, clock)
    try:
        _run_sales(timed, clock)
    finally:
        timed.close()


def _run_sales(db: Database, clock: FakeDateTime) -> None:
    rng = random.Random(2026)
    buyer = make_account(db, 10**14)
    providers = [make_account(db), make_account(db)]
    listings: list[ListingInfo] = []
    for own_fee in [None, *FEES_BPS]:
        for provider in [*providers, None]:
            price = Price(rng.choice(AWKWARD_PRICES), rng.choice(AWKWARD_PRICES))
            listings.append(
                apply_listing(
                    db,
                    ListingSpec(
                        unique("m"),
                        provider=None if provider is None else provider.org.id,
                        price=price,
                        platform_fee_bps=own_fee,
                    ),
                )
            )
    statuses = [UsageStatus.OK, UsageStatus.OK, UsageStatus.CLIENT_DISCONNECTED, UsageStatus.ERROR]
    sales: list[Sale] = []
    for i in range(300):
        clock.now = FakeDateTime().now + timedelta(days=i % 2)
        listing = rng.choice(listings)
        default_fee = rng.choice([*FEES_BPS, 2000])
        sales.append(_sell(db, buyer, listing, listing.fee_bps(default_fee), rng, rng.choice(statuses)))

    for sale in sales:
        usage, listing = sale.usage, sale.listing
        exact = _exact_cost(usage.prompt_tokens, usage.completion_tokens, listing.price)
        expected_cost = 0 if usage.status == "error" else -(-exact.numerator // exact.denominator)
        assert usage.cost_micros == expected_cost
        assert usage.provider_org_id == listing.provider_org_id
        if listing.provider_org_id is None:  # the platform's own model: all of it is the platform's
            assert (usage.provider_micros, usage.platform_fee_micros) == (0, usage.cost_micros)
        _check_split(usage.cost_micros, sale.fee_bps, usage.provider_micros, usage.platform_fee_micros)
    assert any(s.usage.provider_micros > 0 for s in sales) and any(s.usage.status == "error" for s in sales)

    # The ledger: the buyer paid exactly the sales, each provider earned exactly its shares, one entry each.
    assert balance_micros(db, buyer.org.id) == 10**14 - sum(s.usage.cost_micros for s in sales)
    earnings = _earning_entries(db, [s.usage.reservation_id for s in sales])
    for provider in providers:
        mine = [s.usage for s in sales if s.usage.provider_org_id == provider.org.id]
        assert balance_micros(db, provider.org.id) == sum(u.provider_micros for u in mine)
        assert {e.idempotency_key for e in earnings if e.org_id == provider.org.id} == {
            f"earning:{u.reservation_id}" for u in mine if u.provider_micros > 0
        }
    credited = {entry.idempotency_key: entry.amount_micros for entry in earnings}
    for sale in sales:
        key = f"earning:{sale.usage.reservation_id}"
        if sale.usage.status == "error" or sale.usage.provider_micros == 0:
            assert key not in credited  # nothing charged, nothing credited
        else:
            assert credited[key] == sale.usage.provider_micros

    # The earnings report agrees, per provider and for the operator.
    day0 = FakeDateTime().now.date()
    everyone = provider_earnings(db, None, day0, day0 + timedelta(days=1))
    assert all(row.provider_org_id is not None for row in everyone)
    for provider in providers:
        rows = provider_earnings(db, provider.org.id, day0, day0 + timedelta(days=1))
        assert rows == [r for r in everyone if r.provider_org_id == provider.org.id]
        mine = [s.usage for s in sales if s.usage.provider_org_id == provider.org.id]
        assert {r.day for r in rows} == {day0, day0 + timedelta(days=1)}
        assert sum(r.num_requests for r in rows) == len(mine)
        assert sum(r.prompt_tokens for r in rows) == sum(u.prompt_tokens for u in mine)
        assert sum(r.completion_tokens for r in rows) == sum(u.completion_tokens for u in mine)
        assert sum(r.sales_micros for r in rows) == sum(u.cost_micros for u in mine)
        assert sum(r.earnings_micros for r in rows) == sum(u.provider_micros for u in mine)
        assert sum(r.platform_fee_micros for r in rows) == sum(u.platform_fee_micros for u in mine)
        assert all(r.sales_micros == r.earnings_micros + r.platform_fee_micros for r in rows)
        first_day = provider_earnings(db, provider.org.id, day0, day0)
        assert {r.day for r in first_day} == {day0}
    with pytest.raises(InvalidArgument, match="^start: "):
        provider_earnings(db, None, day0, day0 - timedelta(days=1))


def _earning_entries(db: Database, reservation_ids: list[str]) -> list[LedgerEntry]:
    keys = [f"earning:{rid}" for rid in reservation_ids]
    with db.read() as session:
        return list(session.scalars(select(LedgerEntry).where(LedgerEntry.idempotency_key.in_(keys))))


def test_the_split_and_the_provider_are_quoted_at_admission(db: Database) -> None:
    buyer, first, second = make_account(db, 10**9), make_account(db), make_account(db)
    spec = ListingSpec(unique("m"), provider=first.org.id, price=Price(1_000_000, 0), platform_fee_bps=2500)
    listing = apply_listing(db, spec)
    gate = AdmissionControl(db, InMemoryRateLimiter(clock=FakeClock()), default_fee_bps=9000)
    admission = gate.admit(buyer.principal, gate.resolve(buyer.principal, listing.model), 1_000, 0)
    with db.read() as session:
        row = session.get(ReservationRow, admission.reservation.id)
        assert row is not None and (row.provider_org_id, row.platform_fee_bps) == (first.org.id, 2500)
    # The listing changes hands and terms while the request runs: this sale keeps the terms it was sold on.
    apply_listing(db, ListingSpec(spec.model, provider=second.org.id, platform_fee_bps=0))
    usage = gate.finish(admission, 1_000, 0, "ok", 0.1)
    assert (usage.cost_micros, usage.provider_micros, usage.platform_fee_micros) == (1_000, 750, 250)
    assert (balance_micros(db, first.org.id), balance_micros(db, second.org.id)) == (750, 0)

    # A listing without its own fee is sold at the server's default.
    apply_listing(db, ListingSpec(spec.model, provider=second.org.id))
    again = gate.admit(buyer.principal, gate.resolve(buyer.principal, spec.model), 1_000, 0)
    assert gate.finish(again, 1_000, 0, "ok", 0.1).provider_micros == 100
    assert get_listing(db, spec.model).fee_bps(9000) == 9000


def test_a_provider_calling_its_own_model_pays_like_a_buyer_and_earns_nothing(db: Database) -> None:
    """The platform runs the model whoever calls it: an organization using its own fine-tune (or testing the
    model it sells) pays the price, and a provider's earnings only ever come from other organizations."""
    provider = make_account(db, 10_000)
    listing = apply_listing(
        db, ListingSpec(unique("m"), provider=provider.org.id, price=Price(1_000_000, 1_000_000))
    )
    held = reserve(db, provider.principal, listing, 100, 100, fee_bps=listing.fee_bps(2000))
    usage = settle(db, held, 100, 50, "ok", 0.1)
    assert (usage.cost_micros, usage.provider_micros, usage.platform_fee_micros) == (150, 0, 150)
    assert balance_micros(db, provider.org.id) == 10_000 - 150
    kinds = sorted((e.kind, e.amount_micros) for e in list_entries(db, provider.org.id))
    assert kinds == [("charge", -150), ("topup", 10_000)]


def test_two_organizations_buying_each_others_models_at_once(db: Database) -> None:
    """Each settle locks its buyer and inserts an earning for the other organization. Locking the provider as
    well would deadlock on PostgreSQL when A buys from B while B buys from A; a deadlock would surface here
    as a failed thread (PostgreSQL aborts one transaction) or a hung one."""
    start = 10**12
    alice, bob = make_account(db, start), make_account(db, start)
    price = Price(3_333_333, 7_777_777)
    alices = apply_listing(
        db, ListingSpec(unique("m"), provider=alice.org.id, price=price, platform_fee_bps=1)
    )
    bobs = apply_listing(db, ListingSpec(unique("m"), provider=bob.org.id, price=price))
    sales: list[UsageInfo] = []
    lock = threading.Lock()

    def shop(i: int) -> None:
        rng = random.Random(i)
        buyer, listing = (alice, bobs) if i % 2 else (bob, alices)
        for _ in range(12):
            held = reserve(
                db, buyer.principal, listing, rng.randint(0, 5_000), 5_000, fee_bps=listing.fee_bps(3333)
            )
            usage = settle(db, held, held.prompt_tokens, rng.randint(0, 5_000), "ok", 0.01)
            with lock:
                sales.append(usage)

    _race(16, shop)
    assert len(sales) == 16 * 12
    for name, account, listing in [("alice", alice, alices), ("bob", bob, bobs)]:
        bought = [u for u in sales if u.org_id == account.org.id]
        sold = [u for u in sales if u.model == listing.model]
        for usage in sold:
            fee = 1 if listing is alices else 3333
            _check_split(usage.cost_micros, fee, usage.provider_micros, usage.platform_fee_micros)
        expected = start - sum(u.cost_micros for u in bought) + sum(u.provider_micros for u in sold)
        assert balance_micros(db, account.org.id) == expected, name
        assert sum(
            r.earnings_micros for r in provider_earnings(db, account.org.id, date.min, date.max)
        ) == sum(u.provider_micros for u in sold)


def _race(num_threads: int, target: Callable[[int], None]) -> None:
    barrier = threading.Barrier(num_threads)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            target(i)
        except BaseException as exc:  # surfaced below: a thread must not hide a failure
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung: deadlock?"
    assert errors == []
