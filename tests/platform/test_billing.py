"""The billing state machine for single requests: reserve the worst case, settle the actual usage, release,
refuse what the balance or the key's spend limit cannot cover; and the reports built from it."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import func, select

from tests.platform.helpers import FakeDateTime, make_account, priced_model, reopen, reserve_model
from tokenmill.platform.billing import UsageStatus, release, settle
from tokenmill.platform.db import Database
from tokenmill.platform.errors import (
    InsufficientQuota,
    InvalidArgument,
    ModelNotAllowed,
    ModelNotFound,
    ReservationClosed,
)
from tokenmill.platform.ledger import balance_micros, list_entries
from tokenmill.platform.pricing import set_model_price
from tokenmill.platform.tables import Reservation, UsageRecord
from tokenmill.platform.usage import usage_report, user_info


def _usage_count(db: Database, reservation_id: str) -> int:
    with db.read() as session:
        return int(
            session.scalar(select(func.count()).where(UsageRecord.reservation_id == reservation_id)) or 0
        )


def test_reserve_holds_the_worst_case_and_settle_charges_the_actual_usage(db: Database) -> None:
    account = make_account(db, 10_000)
    model = priced_model(db, 2_000_000, 6_000_000)  # 2 and 6 micros per token
    held = reserve_model(db, account.principal, model, prompt_tokens=100, max_tokens=500)
    assert held.reserved_micros == 100 * 2 + 500 * 6 == 3_200
    info = user_info(db, account.principal)
    assert (info.balance_micros, info.held_micros, info.available_micros) == (10_000, 3_200, 6_800)

    usage = settle(db, held, prompt_tokens=100, completion_tokens=42, status="ok", latency_s=0.25)
    assert (usage.cost_micros, usage.latency_ms, usage.status) == (100 * 2 + 42 * 6, 250, "ok")
    assert balance_micros(db, account.org.id) == 10_000 - 452
    assert [e.amount_micros for e in list_entries(db, account.org.id) if e.kind == "charge"] == [-452]
    info = user_info(db, account.principal)
    assert (info.held_micros, info.available_micros, info.key_committed_micros) == (0, 9_548, 452)

    with pytest.raises(ReservationClosed):
        settle(db, held, prompt_tokens=100, completion_tokens=42, status="ok", latency_s=0.25)
    with pytest.raises(ReservationClosed):
        release(db, held)
    assert balance_micros(db, account.org.id) == 9_548 and _usage_count(db, held.id) == 1  # not twice


def test_dropped_streams_pay_for_what_was_generated_and_engine_errors_pay_nothing(db: Database) -> None:
    account = make_account(db, 10_000)
    model = priced_model(db, 1_000_000, 1_000_000)
    dropped = reserve_model(db, account.principal, model, 10, 100)
    failed = reserve_model(db, account.principal, model, 10, 100)
    with pytest.raises(InvalidArgument, match="status"):
        settle(db, dropped, 10, 7, "finished", 1.0)  # refused before anything is written
    assert settle(db, dropped, 10, 7, UsageStatus.CLIENT_DISCONNECTED, 1.0).cost_micros == 17
    error = settle(db, failed, 10, 3, UsageStatus.ERROR, 0.1)
    assert (error.cost_micros, error.status, _usage_count(db, failed.id)) == (0, "error", 1)
    assert balance_micros(db, account.org.id) == 10_000 - 17


def test_release_returns_the_hold_without_charge_or_usage_record(db: Database) -> None:
    account = make_account(db, 1_000)
    model = priced_model(db, 1_000_000, 1_000_000)
    held = reserve_model(db, account.principal, model, 400, 600)
    with pytest.raises(InsufficientQuota):
        reserve_model(db, account.principal, model, 1, 0)  # everything is held
    release(db, held)
    assert balance_micros(db, account.org.id) == 1_000 and _usage_count(db, held.id) == 0
    reserve_model(db, account.principal, model, 400, 600)  # available again


def test_refusals_write_nothing_and_say_why(db: Database) -> None:
    account = make_account(db, 999)
    model = priced_model(db, 1_000_000, 1_000_000)
    with pytest.raises(InsufficientQuota) as caught:
        reserve_model(db, account.principal, model, 500, 500)
    assert (caught.value.reason, caught.value.needed_micros, caught.value.available_micros) == (
        "balance",
        1000,
        999,
    )
    with pytest.raises(ModelNotFound):
        reserve_model(db, account.principal, "no-such-model", 1, 1)
    limited = make_account(db, 10_000, allowed_models=[model])
    with pytest.raises(ModelNotAllowed):
        reserve_model(db, limited.principal, priced_model(db, 0, 0), 1, 1)
    with db.read() as session:
        assert (
            session.scalar(
                select(func.count()).where(Reservation.org_id.in_([account.org.id, limited.org.id]))
            )
            == 0
        )


def test_key_spend_limit_counts_spent_and_held_money(db: Database) -> None:
    account = make_account(db, 1_000_000, spend_limit_micros=1_000)
    model = priced_model(db, 1_000_000, 1_000_000)
    first = reserve_model(db, account.principal, model, 300, 300)
    with pytest.raises(InsufficientQuota) as caught:
        reserve_model(db, account.principal, model, 300, 300)
    assert caught.value.reason == "key_spend_limit" and caught.value.available_micros == 400
    settle(db, first, 300, 100, "ok", 0.5)  # 400 spent, 600 left under the limit
    reserve_model(db, account.principal, model, 300, 300)


def test_free_models_are_served_with_an_empty_balance_and_cost_nothing(db: Database) -> None:
    account = make_account(db, 0)
    model = priced_model(db, 0, 0)
    held = reserve_model(db, account.principal, model, 1_000, 1_000)
    assert held.reserved_micros == 0
    assert settle(db, held, 1_000, 900, "ok", 2.0).cost_micros == 0
    assert list_entries(db, account.org.id) == []


def test_settle_charges_the_price_quoted_at_admission(db: Database) -> None:
    account = make_account(db, 100_000)
    model = priced_model(db, 1_000_000, 1_000_000)
    held = reserve_model(db, account.principal, model, 10, 10)
    set_model_price(db, model, 50_000_000, 50_000_000)  # the admin raises the price mid-request
    assert settle(db, held, 10, 10, "ok", 0.1).cost_micros == 20


def test_usage_report_groups_by_model_and_utc_day_within_the_range(db: Database) -> None:
    clock = FakeDateTime()
    timed = reopen(db, clock)
    try:
        account = make_account(timed, 1_000_000)
        other = make_account(timed, 1_000_000)
        small, large = priced_model(timed, 1_000_000, 2_000_000), priced_model(timed, 3_000_000, 3_000_000)
        plan = [(0, small, 10, 5), (0, small, 20, 5), (0, large, 1, 1), (1, small, 7, 0), (3, small, 1, 1)]
        for day_offset, model, prompt, completion in plan:
            clock.now = FakeDateTime().now + timedelta(days=day_offset)
            settle(
                timed,
                reserve_model(timed, account.principal, model, prompt, 10),
                prompt,
                completion,
                "ok",
                0.1,
            )
        settle(
            timed, reserve_model(timed, other.principal, small, 5, 5), 5, 5, "ok", 0.1
        )  # another organization
        day0 = date(2025, 3, 1)
        rows = usage_report(timed, account.org.id, day0, day0 + timedelta(days=1))
        assert [
            (r.day, r.model, r.num_requests, r.prompt_tokens, r.completion_tokens, r.cost_micros)
            for r in rows
        ] == sorted(
            [
                (day0, small, 2, 30, 10, 30 + 20),
                (day0, large, 1, 1, 1, 6),
                (day0 + timedelta(days=1), small, 1, 7, 0, 7),
            ]
        )
        everyone = usage_report(timed, None, day0, day0 + timedelta(days=3))
        assert {r.org_id for r in everyone} >= {account.org.id, other.org.id}
    finally:
        timed.close()
