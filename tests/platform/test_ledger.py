"""The balance ledger: append-only, balance = sum, top-ups idempotent even when retried concurrently,
bad amounts refused with nothing written."""

from __future__ import annotations

import threading

import pytest

from tests.platform.helpers import make_account, unique
from tokenmill.platform.db import Database
from tokenmill.platform.errors import IdempotencyConflict, InvalidAmount, InvalidArgument, UnknownOrganization
from tokenmill.platform.ledger import adjust, balance_micros, list_entries, refund, top_up


def test_top_up_is_idempotent_by_client_key(db: Database) -> None:
    org = make_account(db).org
    key = unique("topup")
    first = top_up(db, org.id, 5_000_000, idempotency_key=key, note="invoice 1")
    again = top_up(db, org.id, 5_000_000, idempotency_key=key, note="retry")
    assert first.created and not again.created and again.entry == first.entry
    assert balance_micros(db, org.id) == 5_000_000
    assert len(list_entries(db, org.id)) == 1

    with pytest.raises(IdempotencyConflict):
        top_up(db, org.id, 6_000_000, idempotency_key=key)  # same key, different amount
    other = make_account(db).org
    with pytest.raises(IdempotencyConflict):
        top_up(db, other.id, 5_000_000, idempotency_key=key)  # same key, different organization
    assert balance_micros(db, org.id) == 5_000_000 and balance_micros(db, other.id) == 0


def test_concurrent_retries_of_one_top_up_write_one_entry(db: Database) -> None:
    org = make_account(db).org
    key = unique("topup")
    barrier = threading.Barrier(16)
    created: list[bool] = []

    def retry() -> None:
        barrier.wait()
        created.append(top_up(db, org.id, 1_000, idempotency_key=key).created)

    threads = [threading.Thread(target=retry) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(created) == [False] * 15 + [True]
    assert balance_micros(db, org.id) == 1_000


@pytest.mark.parametrize("amount", [0, -1, -5_000_000, 1.5, 2.0, "100", True, None, 10**16])
def test_bad_top_up_amounts_are_refused_and_write_nothing(db: Database, amount: object) -> None:
    org = make_account(db).org
    with pytest.raises(InvalidAmount, match="amount_micros"):
        top_up(db, org.id, amount, idempotency_key=unique("bad"))  # type: ignore[arg-type]
    assert list_entries(db, org.id) == [] and balance_micros(db, org.id) == 0


def test_unknown_organization_and_bad_keys_are_refused(db: Database) -> None:
    with pytest.raises(UnknownOrganization):
        top_up(db, "org_missing", 1_000, idempotency_key=unique("k"))
    org = make_account(db).org
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        top_up(db, org.id, 1_000, idempotency_key="")
    assert list_entries(db, org.id) == []


def test_refunds_and_adjustments_are_entries_and_balance_is_their_sum(db: Database) -> None:
    org = make_account(db, 10_000).org
    refund(db, org.id, 2_500, idempotency_key=unique("r"), note="bad answer")
    adjust(db, org.id, -4_000, idempotency_key=unique("a"), note="correction")
    with pytest.raises(InvalidArgument, match="note"):
        adjust(db, org.id, 1, idempotency_key=unique("a"), note=" ")
    with pytest.raises(InvalidAmount):
        refund(db, org.id, -1, idempotency_key=unique("r"), note="negative refund")
    entries = list_entries(db, org.id)
    assert [e.kind for e in entries] == ["adjustment", "refund", "topup"]  # newest first
    assert balance_micros(db, org.id) == sum(e.amount_micros for e in entries) == 8_500
