"""The admission sequence `serving/` calls around the engine: grant, rate limit and reservation taken
together, and every refusal leaves nothing held behind (no money, no rate-limit slot)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from tests.platform.helpers import FakeClock, make_account, priced_model, unique
from tokenmill.platform.admission import AdmissionControl
from tokenmill.platform.db import Database
from tokenmill.platform.errors import InsufficientQuota, ModelNotAllowed, RateLimited
from tokenmill.platform.ledger import balance_micros, top_up
from tokenmill.platform.ratelimit import RateLimitPolicy, RateLimits
from tokenmill.platform.ratelimit_memory import InMemoryRateLimiter
from tokenmill.platform.tables import Reservation
from tokenmill.platform.usage import user_info

POLICY = RateLimitPolicy(
    tiers={"default": RateLimits(requests_per_minute=3, tokens_per_minute=10_000, max_concurrent_requests=1)},
    free_models=RateLimits(requests_per_minute=1),
)


def _gate(db: Database) -> AdmissionControl:
    return AdmissionControl(db, InMemoryRateLimiter(clock=FakeClock(1_700_000_040.0)), POLICY)


def _num_reservations(db: Database, org_id: str) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.count()).where(Reservation.org_id == org_id)) or 0)


def test_admit_then_finish_charges_and_frees_the_slot(db: Database) -> None:
    gate, account = _gate(db), make_account(db, 100_000)
    model = priced_model(db, 1_000_000, 1_000_000)
    admission = gate.admit(account.principal, model, prompt_tokens=100, max_tokens=400)
    assert admission.reservation.reserved_micros == 500
    assert admission.rate_limit.headers()["x-ratelimit-remaining-tokens"] == "9500"
    with pytest.raises(RateLimited) as caught:
        gate.admit(account.principal, model, 1, 1)  # one concurrent request at most
    assert caught.value.decision.reason == "concurrency"

    usage = gate.finish(admission, 100, 50, "client_disconnected", latency_s=0.3)
    assert usage.cost_micros == 150 and balance_micros(db, account.org.id) == 100_000 - 150
    follow_up = gate.admit(account.principal, model, 100, 400)  # slot free, unused tokens given back
    assert follow_up.rate_limit.remaining_tokens == 10_000 - 150 - 500
    gate.abort(follow_up)
    assert user_info(db, account.principal).held_micros == 0


def test_refusals_hold_nothing(db: Database) -> None:
    gate, account = _gate(db), make_account(db, 100, allowed_models=None)
    model = priced_model(db, 1_000_000, 1_000_000)
    with pytest.raises(InsufficientQuota):
        gate.admit(account.principal, model, 100, 400)
    top_up(db, account.org.id, 1_000, idempotency_key=unique("t"))
    gate.finish(gate.admit(account.principal, model, 100, 400), 100, 0, "ok", 0.1)  # the slot was not leaked
    gate.finish(gate.admit(account.principal, model, 1, 1), 1, 1, "ok", 0.1)
    with pytest.raises(RateLimited) as caught:
        gate.admit(account.principal, model, 1, 1)  # the 4th request of the minute
    assert (
        caught.value.decision.reason == "requests" and caught.value.decision.headers()["retry-after"] == "60"
    )
    assert _num_reservations(db, account.org.id) == 2  # refused requests never reached billing

    limited = make_account(db, 1_000, allowed_models=["other"])
    with pytest.raises(ModelNotAllowed):
        gate.admit(limited.principal, model, 1, 1)


def test_free_models_get_the_stricter_limits_on_their_own_counter(db: Database) -> None:
    gate, account = _gate(db), make_account(db, 0)
    free, paid = priced_model(db, 0, 0), priced_model(db, 0, 1)
    gate.finish(gate.admit(account.principal, free, 10, 10), 10, 10, "ok", 0.1)
    with pytest.raises(RateLimited):
        gate.admit(account.principal, free, 10, 10)  # 1 request per minute on free models
    top_up(db, account.org.id, 10, idempotency_key=unique("t"))
    gate.finish(gate.admit(account.principal, paid, 10, 10), 10, 10, "ok", 0.1)  # paid allowance untouched
