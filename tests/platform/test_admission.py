"""The admission sequence `serving/` calls around the engine: grant, rate limit and reservation taken
together, every refusal leaves nothing held behind (no money, no rate-limit slot), the limits are the
organization's tier's as of this request, and a refusal names the limit that refused."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from tests.platform.helpers import FakeClock, make_account, priced_model, unique
from tokenmill.platform.admission import Admission, AdmissionControl
from tokenmill.platform.auth import authenticate
from tokenmill.platform.db import Database
from tokenmill.platform.errors import InsufficientQuota, ModelNotAllowed, ModelNotFound
from tokenmill.platform.ledger import balance_micros, top_up
from tokenmill.platform.pricing import Price, set_model_price
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.platform.ratelimit import RateLimited
from tokenmill.platform.ratelimit_memory import InMemoryRateLimiter
from tokenmill.platform.tables import Reservation
from tokenmill.platform.tiers import set_tier_limits
from tokenmill.platform.usage import user_info

SMALL_TIER = {
    "requests_per_minute": 3,
    "tokens_per_minute": 10_000,
    "max_concurrent_requests": 1,
    "free_requests_per_minute": 1,
    "free_tokens_per_minute": None,
    "free_max_concurrent_requests": None,
}


def _tier(db: Database, **limits: int | None) -> str:
    """A fresh tier (the module's database is shared: `default` is left alone)."""
    name = unique("tier")
    set_tier_limits(db, name, {**SMALL_TIER, **limits})
    return name


def _admit(
    gate: AdmissionControl, principal: KeyPrincipal, model: str, prompt_tokens: int, max_tokens: int
) -> Admission:
    """What `serving/` does: resolve the listing, then admit the request for it."""
    return gate.admit(principal, gate.resolve(principal, model), prompt_tokens, max_tokens)


def _gate(db: Database) -> AdmissionControl:
    return AdmissionControl(db, InMemoryRateLimiter(clock=FakeClock(1_700_000_040.0)))


def _num_reservations(db: Database, org_id: str) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.count()).where(Reservation.org_id == org_id)) or 0)


def test_admit_then_finish_charges_and_frees_the_slot(db: Database) -> None:
    gate, account = _gate(db), make_account(db, 100_000, tier=_tier(db))
    model = priced_model(db, 1_000_000, 1_000_000)
    admission = _admit(gate, account.principal, model, prompt_tokens=100, max_tokens=400)
    assert admission.reservation.reserved_micros == 500
    assert admission.rate_limit.headers()["x-ratelimit-remaining-tokens"] == "9500"
    with pytest.raises(RateLimited) as caught:
        _admit(gate, account.principal, model, 1, 1)  # one concurrent request at most
    assert caught.value.decision.reason == "concurrency"

    usage = gate.finish(admission, 100, 50, "client_disconnected", latency_s=0.3)
    assert usage.cost_micros == 150 and balance_micros(db, account.org.id) == 100_000 - 150
    follow_up = _admit(gate, account.principal, model, 100, 400)  # slot free, unused tokens given back
    assert follow_up.rate_limit.remaining_tokens == 10_000 - 150 - 500
    gate.abort(follow_up)
    assert user_info(db, account.principal).held_micros == 0


def test_refusals_hold_nothing(db: Database) -> None:
    gate, account = _gate(db), make_account(db, 100, tier=_tier(db), allowed_models=None)
    model = priced_model(db, 1_000_000, 1_000_000)
    with pytest.raises(InsufficientQuota):
        _admit(gate, account.principal, model, 100, 400)
    top_up(db, account.org.id, 1_000, idempotency_key=unique("t"))
    gate.finish(
        _admit(gate, account.principal, model, 100, 400), 100, 0, "ok", 0.1
    )  # the slot was not leaked
    gate.finish(_admit(gate, account.principal, model, 1, 1), 1, 1, "ok", 0.1)
    with pytest.raises(RateLimited) as caught:
        _admit(gate, account.principal, model, 1, 1)  # the 4th request of the minute
    assert (
        caught.value.decision.reason == "requests" and caught.value.decision.headers()["retry-after"] == "60"
    )
    assert _num_reservations(db, account.org.id) == 2  # refused requests never reached billing

    limited = make_account(db, 1_000, allowed_models=["other"])
    with pytest.raises(ModelNotAllowed):
        _admit(gate, limited.principal, model, 1, 1)


def test_free_models_get_the_tiers_free_limits_on_their_own_counter(db: Database) -> None:
    gate, account = _gate(db), make_account(db, 0, tier=_tier(db))
    free, paid = priced_model(db, 0, 0), priced_model(db, 0, 1)
    gate.finish(_admit(gate, account.principal, free, 10, 10), 10, 10, "ok", 0.1)
    with pytest.raises(RateLimited):
        _admit(gate, account.principal, free, 10, 10)  # 1 request per minute on free models
    top_up(db, account.org.id, 10, idempotency_key=unique("t"))
    gate.finish(_admit(gate, account.principal, paid, 10, 10), 10, 10, "ok", 0.1)  # paid allowance untouched


def test_a_change_to_the_tier_applies_from_the_next_request(db: Database) -> None:
    tier = _tier(db, free_max_concurrent_requests=16, free_requests_per_minute=100)
    gate, account, free = _gate(db), make_account(db, tier=tier), priced_model(db, 0, 0)
    held = [_admit(gate, account.principal, free, 10, 10) for _ in range(3)]
    set_tier_limits(db, tier, {"free_max_concurrent_requests": 3})
    principal = authenticate(db, account.key.key)  # the next request authenticates again
    with pytest.raises(RateLimited) as caught:
        _admit(gate, principal, free, 10, 10)
    assert caught.value.decision.reason == "concurrency"
    assert str(caught.value) == (
        f"Too many concurrent requests: the {tier!r} tier's limit of 3 concurrent requests for free models."
    )
    assert caught.value.decision.headers()["retry-after"] == "1"
    for admission in held:
        gate.abort(admission)


def test_a_request_that_can_never_fit_says_which_limit_and_by_how_much(db: Database) -> None:
    gate = _gate(db)
    keyed = make_account(db, 10**6, tier=_tier(db), tokens_per_minute=100_000)
    paid = priced_model(db, 1, 1)
    with pytest.raises(RateLimited) as caught:
        _admit(gate, keyed.principal, paid, 100, 119_900)
    assert str(caught.value) == (
        "This request needs 120,000 tokens (prompt 100 + max_tokens 119,900), more than this API key's limit "
        "of 100,000 tokens per minute for paid models; lower max_tokens or ask for a higher limit."
    )
    headers = caught.value.decision.headers()
    assert "retry-after" not in headers and headers["x-ratelimit-limit-tokens"] == "100000"

    tier = _tier(db, free_tokens_per_minute=50)
    on_tier, free = make_account(db, tier=tier), priced_model(db, 0, 0)
    with pytest.raises(RateLimited) as caught:
        _admit(
            gate, on_tier.principal, free, 60, 0
        )  # an embedding: no completion, the input alone is too long
    assert str(caught.value) == (
        f"This request needs 60 tokens, more than the {tier!r} tier's limit of 50 tokens per minute for free "
        "models; shorten the input or ask for a higher limit."
    )
    assert _num_reservations(db, keyed.org.id) == _num_reservations(db, on_tier.org.id) == 0


def test_resolve_refuses_the_grant_first_and_admit_uses_the_resolved_terms(db: Database) -> None:
    gate = _gate(db)
    provider = make_account(db)
    account = make_account(db, 100_000, tier=_tier(db))
    private = priced_model(db, 1_000_000, 1_000_000, provider=provider.org.id, visibility="private")
    limited = make_account(db, 1_000, allowed_models=["something-else"])
    with pytest.raises(ModelNotAllowed):
        gate.resolve(limited.principal, private)  # the key's grant is checked before the catalog
    with pytest.raises(ModelNotFound):
        gate.resolve(account.principal, private)

    model = priced_model(db, 1_000_000, 1_000_000)
    listing = gate.resolve(account.principal, model)
    set_model_price(db, model, 9_000_000, 9_000_000)  # after resolution: this request keeps its terms
    admission = gate.admit(account.principal, listing, 100, 100)
    assert admission.reservation.reserved_micros == 200
    assert gate.finish(admission, 100, 100, "ok", 0.1).cost_micros == 200
    assert gate.resolve(account.principal, model).price == Price(9_000_000, 9_000_000)
