"""Billing under concurrency: many threads race to reserve and settle against one account whose balance
covers only some of them. The ledger must reconcile to the micro and never go below zero."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from sqlalchemy import func, select

from tests.platform.helpers import make_account, priced_model, reserve_model
from tokenmill.platform.billing import UsageStatus, settle
from tokenmill.platform.db import Database
from tokenmill.platform.errors import InsufficientQuota
from tokenmill.platform.ledger import balance_micros, list_entries
from tokenmill.platform.pricing import Price, cost_micros
from tokenmill.platform.tables import Reservation, UsageRecord

NUM_REQUESTS = 200
PROMPT_TOKENS, MAX_TOKENS = 100, 50
INPUT_MICROS_PER_MTOK, OUTPUT_MICROS_PER_MTOK = 2_000_000, 6_000_000  # 2 and 6 micros per token
WORST_CASE_MICROS = PROMPT_TOKENS * 2 + MAX_TOKENS * 6  # 500
AFFORDABLE_WORST_CASES = 40


@dataclass(frozen=True)
class Outcome:
    completion_tokens: int
    status: UsageStatus
    cost_micros: int


def _race(db: Database, target: object, num_threads: int) -> None:
    barrier = threading.Barrier(num_threads)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            target(i)  # type: ignore[operator]
        except BaseException as exc:  # surfaced below: a thread must not hide a failure
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_concurrent_requests_never_overdraw_and_reconcile_exactly(db: Database) -> None:
    topped_up = AFFORDABLE_WORST_CASES * WORST_CASE_MICROS
    account = make_account(db, topped_up)
    model = priced_model(db, INPUT_MICROS_PER_MTOK, OUTPUT_MICROS_PER_MTOK)
    served: dict[int, Outcome] = {}
    refused: list[int] = []

    def request(i: int) -> None:
        rng = random.Random(i)
        try:
            held = reserve_model(db, account.principal, model, PROMPT_TOKENS, MAX_TOKENS)
        except InsufficientQuota:
            refused.append(i)  # refused at admission: no token would be generated
            return
        completion_tokens = rng.randint(MAX_TOKENS // 2, MAX_TOKENS)
        status = rng.choice(
            [UsageStatus.OK, UsageStatus.OK, UsageStatus.CLIENT_DISCONNECTED, UsageStatus.ERROR]
        )
        usage = settle(db, held, PROMPT_TOKENS, completion_tokens, status, latency_s=0.01)
        served[i] = Outcome(completion_tokens, status, usage.cost_micros)

    _race(db, request, NUM_REQUESTS)

    assert len(served) + len(refused) == NUM_REQUESTS
    # Charges never exceed holds, so the first AFFORDABLE_WORST_CASES always fit; at most twice as many can
    # (every served request costs at least half its worst case), so some must have been refused.
    assert AFFORDABLE_WORST_CASES <= len(served) <= 2 * AFFORDABLE_WORST_CASES and refused

    # tokens x prices, computed independently of the platform (prices are whole micros per token here)
    expected = sum(
        0 if o.status is UsageStatus.ERROR else PROMPT_TOKENS * 2 + o.completion_tokens * 6
        for o in served.values()
    )
    charges = [e.amount_micros for e in list_entries(db, account.org.id, limit=10_000) if e.kind == "charge"]
    with db.read() as session:
        usage_costs = session.scalars(
            select(UsageRecord.cost_micros).where(UsageRecord.org_id == account.org.id)
        ).all()
        states = dict(
            session.execute(
                select(Reservation.state, func.count())
                .where(Reservation.org_id == account.org.id)
                .group_by(Reservation.state)
            ).all()
        )
    assert sum(usage_costs) == -sum(charges) == sum(o.cost_micros for o in served.values()) == expected
    assert len(usage_costs) == len(served) and states == {"settled": len(served)}  # refused: no rows at all
    balance = balance_micros(db, account.org.id)
    assert balance == topped_up - expected >= 0  # charges only ever decrease it: never negative on the way


def test_concurrent_requests_respect_the_key_spend_limit(db: Database) -> None:
    limit = 10 * WORST_CASE_MICROS
    account = make_account(db, 10**9, spend_limit_micros=limit)
    model = priced_model(db, INPUT_MICROS_PER_MTOK, OUTPUT_MICROS_PER_MTOK)
    price = Price(INPUT_MICROS_PER_MTOK, OUTPUT_MICROS_PER_MTOK)
    refused: list[str] = []

    def request(_: int) -> None:
        try:
            held = reserve_model(db, account.principal, model, PROMPT_TOKENS, MAX_TOKENS)
        except InsufficientQuota as exc:
            refused.append(exc.reason)
            return
        settle(db, held, PROMPT_TOKENS, MAX_TOKENS, "ok", 0.01)

    _race(db, request, 50)
    spent = 10**9 - balance_micros(db, account.org.id)
    assert (
        spent == 10 * cost_micros(PROMPT_TOKENS, MAX_TOKENS, price) == limit
    )  # exactly the limit, never more
    assert refused == ["key_spend_limit"] * 40
