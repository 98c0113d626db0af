"""Rate limits on both backends with an injected clock: requests and tokens per window, concurrency, the
values behind OpenAI's headers; the Redis backend shared by two limiter instances (two gateways); leases
kept by their gateway's heartbeat, freed by its death (TTL) or its restart; and the one rule giving a
request its limits (its tier's for free or paid models, each key override replacing its dimension)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from tests.platform.helpers import FakeClock
from tokenmill.platform.ratelimit import (
    LEASE_REFRESH_S,
    LEASE_TTL_S,
    LIMIT_FIELDS,
    LeaseHeartbeat,
    RateLimiter,
    RateLimits,
    TierLimits,
    format_duration,
    resolve_scope,
)

MakeLimiter = Callable[..., RateLimiter]
WINDOW_START = 1_700_000_040.0  # a multiple of 60: the start of a window


def test_the_n_plus_first_request_in_a_window_is_denied_with_retry_after(
    limiter_factory: MakeLimiter,
) -> None:
    clock = FakeClock(WINDOW_START + 0.25)
    limiter = limiter_factory(clock=clock)
    limits = RateLimits(requests_per_minute=5)
    remaining = [limiter.acquire("key_a", limits, 10).remaining_requests for _ in range(5)]
    assert remaining == [4, 3, 2, 1, 0]

    denied = limiter.acquire("key_a", limits, 10)
    assert (denied.allowed, denied.reason, denied.lease) == (False, "requests", None)
    assert denied.retry_after_s == pytest.approx(59.75)
    headers = denied.headers()
    assert headers["retry-after"] == "60" and headers["retry-after-ms"] == "59750"
    assert headers["x-ratelimit-limit-requests"] == "5" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "59.75s"

    assert limiter.acquire("key_b", limits, 10).allowed  # other keys have their own counters
    clock.advance(59.75)  # the next window
    again = limiter.acquire("key_a", limits, 10)
    assert again.allowed and again.remaining_requests == 4


def test_tokens_per_minute_with_unused_tokens_given_back(limiter_factory: MakeLimiter) -> None:
    clock = FakeClock(WINDOW_START)
    limiter = limiter_factory(clock=clock)
    limits = RateLimits(tokens_per_minute=1_000)
    first = limiter.acquire("key", limits, 600)
    assert (
        first.allowed
        and first.remaining_tokens == 400
        and first.headers()["x-ratelimit-reset-tokens"] == "1m0s"
    )
    assert limiter.acquire("key", limits, 300).remaining_tokens == 100
    denied = limiter.acquire("key", limits, 200)
    assert (denied.reason, denied.remaining_tokens, denied.retry_after_s) == ("tokens", 100, 60.0)

    assert first.lease is not None
    limiter.release(first.lease, unused_tokens=500)  # the request generated less than max_tokens
    limiter.release(first.lease, unused_tokens=500)  # a second release gives nothing back twice
    assert limiter.acquire("key", limits, 200).remaining_tokens == 400

    too_large = limiter.acquire("key", limits, 1_001)
    assert (too_large.reason, too_large.retry_after_s, too_large.asked_tokens) == (
        "request_too_large",
        None,
        1_001,
    )
    assert "retry-after" not in too_large.headers()  # waiting cannot help
    assert denied.asked_tokens == 200 and "retry-after" in denied.headers()


def test_no_limits_never_refuse(limiter_factory: MakeLimiter) -> None:
    limiter = limiter_factory(clock=FakeClock(WINDOW_START))
    decisions = [limiter.acquire("key", RateLimits(), 10**6) for _ in range(200)]  # none released
    assert all(d.allowed for d in decisions) and not decisions[-1].headers()


def test_concurrency_limit_frees_slots_on_release_and_after_a_crash(limiter_factory: MakeLimiter) -> None:
    clock = FakeClock(WINDOW_START)
    limiter = limiter_factory(clock=clock, lease_ttl_s=300.0)
    limits = RateLimits(requests_per_minute=100, max_concurrent_requests=2)
    a, b = limiter.acquire("key", limits, 1), limiter.acquire("key", limits, 1)
    denied = limiter.acquire("key", limits, 1)
    assert (a.allowed, b.allowed, denied.allowed, denied.reason) == (True, True, False, "concurrency")
    assert denied.retry_after_s is not None and denied.retry_after_s > 0
    assert denied.remaining_requests == 98  # a denied request consumes nothing

    assert a.lease is not None
    limiter.release(a.lease)
    limiter.release(a.lease)  # idempotent: does not free a second slot
    c = limiter.acquire("key", limits, 1)
    assert c.allowed and not limiter.acquire("key", limits, 1).allowed

    clock.advance(301)  # holders that never released (a crashed gateway) lose their slots
    assert limiter.acquire("key", limits, 1).allowed


@pytest.mark.redis
def test_two_redis_limiters_share_one_limit(redis_limiter_factory: MakeLimiter) -> None:
    clock = FakeClock(WINDOW_START + 10)
    gateway_a, gateway_b = redis_limiter_factory(clock=clock), redis_limiter_factory(clock=clock)
    limits = RateLimits(requests_per_minute=4, max_concurrent_requests=3)
    decisions = [gateway.acquire("key", limits, 1) for gateway in (gateway_a, gateway_b, gateway_a)]
    assert [d.remaining_requests for d in decisions] == [3, 2, 1]
    assert gateway_b.acquire("key", limits, 1).reason == "concurrency"
    assert decisions[0].lease is not None
    gateway_b.release(decisions[0].lease)  # released by another process than the one that acquired
    assert gateway_b.acquire("key", limits, 1).allowed
    assert gateway_a.acquire("key", limits, 1).reason == "requests"


OLD_LEASE_TTL_S = 600.0
"""Before heartbeats, a crashed gateway's slot stayed held this long; a live request must outlive it."""


def test_refreshed_leases_outlive_the_ttl_and_unrefreshed_ones_expire(limiter_factory: MakeLimiter) -> None:
    clock = FakeClock(WINDOW_START)
    limiter = limiter_factory(clock=clock, owner="gw-a")
    limits = RateLimits(max_concurrent_requests=2)
    a, b = limiter.acquire("key", limits, 1), limiter.acquire("key", limits, 1)
    assert b.allowed and a.lease is not None and a.lease.owner == "gw-a"
    assert limiter.release_previous_leases() == 0  # this process's own leases are not a crashed run's

    while clock.now - WINDOW_START <= OLD_LEASE_TTL_S:  # a long stream: the heartbeat beats throughout
        clock.advance(LEASE_REFRESH_S)
        assert limiter.refresh_leases() == 2
    assert limiter.acquire("key", limits, 1).reason == "concurrency"

    limiter.release(a.lease)
    assert limiter.refresh_leases() == 1  # a released lease is not revived
    c = limiter.acquire("key", limits, 1)
    assert c.allowed and limiter.acquire("key", limits, 1).reason == "concurrency"

    clock.advance(LEASE_TTL_S - 1)  # the process died: nothing refreshes b and c any more
    assert limiter.acquire("key", limits, 1).reason == "concurrency"
    clock.advance(2)
    assert limiter.refresh_leases() == 0  # expired leases are not revived either
    assert [limiter.acquire("key", limits, 1).allowed for _ in range(3)] == [True, True, False]


@pytest.mark.redis
def test_a_dead_gateways_slots_free_within_one_ttl_a_live_ones_stay(
    redis_limiter_factory: MakeLimiter,
) -> None:
    clock = FakeClock(WINDOW_START)
    live, dead = (redis_limiter_factory(clock=clock, owner=owner) for owner in ("gw-live", "gw-dead"))
    limits = RateLimits(max_concurrent_requests=3)
    assert [g.acquire("key", limits, 1).allowed for g in (live, dead, dead, live)] == [True] * 3 + [False]

    while clock.now - WINDOW_START <= LEASE_TTL_S:
        clock.advance(LEASE_REFRESH_S)
        assert live.refresh_leases() == 1  # only its own leases: the dead gateway's are left to expire
    allowed = [live.acquire("key", limits, 1).allowed for _ in range(3)]
    assert allowed == [True, True, False]


@pytest.mark.redis
def test_a_restarted_gateway_frees_the_slots_its_crashed_run_held(redis_limiter_factory: MakeLimiter) -> None:
    clock = FakeClock(WINDOW_START)
    crashed, other = (redis_limiter_factory(clock=clock, owner=owner) for owner in ("gw-a", "gw-b"))
    limits = RateLimits(tokens_per_minute=1_000, max_concurrent_requests=4)
    finished = crashed.acquire("key", limits, 100)
    held = [g.acquire("key", limits, 100) for g in (crashed, crashed, other)]
    assert finished.lease is not None and all(d.allowed for d in held)
    crashed.release(finished.lease)  # ended before the crash: not left behind
    other_free = other.acquire("free-key", limits, 100)  # another bucket, another gateway
    assert crashed.acquire("key", limits, 100).allowed  # the fourth slot; then the crash

    restarted = redis_limiter_factory(clock=clock, owner="gw-a")  # same gateway id, a new process
    assert restarted.release_previous_leases() == 3
    assert restarted.release_previous_leases() == 0
    decisions = [restarted.acquire("key", limits, 100) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[3].reason == "concurrency"  # gw-b's slot is still held
    assert decisions[2].remaining_tokens == 200  # slots freed, the window's tokens not given back
    assert other.refresh_leases() == 2 and other_free.allowed
    assert restarted.refresh_leases() == 3


class _CountingLimiter:
    """Counts refreshes and fails the first, as a Redis briefly unreachable would."""

    def __init__(self, beats_wanted: int) -> None:
        self.num_refreshes = 0
        self.beats_wanted = beats_wanted
        self.enough = threading.Event()

    def refresh_leases(self) -> int:
        self.num_refreshes += 1
        if self.num_refreshes >= self.beats_wanted:
            self.enough.set()
        if self.num_refreshes == 1:
            raise ConnectionError("redis down")
        return 0


def test_heartbeat_refreshes_until_stopped_and_survives_a_failed_refresh() -> None:
    limiter = _CountingLimiter(beats_wanted=3)
    heartbeat = LeaseHeartbeat(limiter, period_s=0.01)  # type: ignore[arg-type]
    heartbeat.start()
    try:
        assert limiter.enough.wait(10), "the heartbeat stopped after a failed refresh"
    finally:
        heartbeat.stop()
    assert heartbeat._thread is not None and not heartbeat._thread.is_alive()


TIER = TierLimits("silver", paid=RateLimits(600, 1_000_000, 32), free=RateLimits(120, 200_000, 16))


def test_a_request_gets_its_tiers_limits_for_paid_or_free_models_on_separate_counters() -> None:
    paid = resolve_scope("key_x", TIER, RateLimits(), free_model=False)
    free = resolve_scope("key_x", TIER, RateLimits(), free_model=True)
    assert (paid.limits, free.limits) == (TIER.paid, TIER.free)
    assert paid.bucket != free.bucket  # free traffic does not eat the paid allowance, nor the reverse
    assert {paid.source(name) for name in LIMIT_FIELDS} == {"tier silver"}
    assert free.describe("max_concurrent_requests") == (
        "the 'silver' tier's limit of 16 concurrent requests for free models"
    )


@pytest.mark.parametrize("dimension", LIMIT_FIELDS)
@pytest.mark.parametrize("value", [3, 5_000_000])
def test_each_key_override_replaces_its_dimension_on_paid_and_free_models(dimension: str, value: int) -> None:
    """Lower or higher than the tier's: a key's explicit limit is its limit (free models used to cap it)."""
    for free_model, tier_limits in ((False, TIER.paid), (True, TIER.free)):
        scope = resolve_scope("key_x", TIER, RateLimits(**{dimension: value}), free_model=free_model)
        for name in LIMIT_FIELDS:
            expected = value if name == dimension else getattr(tier_limits, name)
            assert getattr(scope.limits, name) == expected
            assert scope.source(name) == ("key" if name == dimension else "tier silver")
        assert scope.describe(dimension).startswith(f"this API key's limit of {value:,} ")


def test_the_quick_start_key_gets_what_it_was_given_on_a_free_model() -> None:
    key = RateLimits(requests_per_minute=1_000, max_concurrent_requests=16)
    scope = resolve_scope("key_x", TIER, key, free_model=True)
    assert scope.limits == RateLimits(1_000, 200_000, 16)


def test_unlimited_is_unlimited_unless_the_key_says_otherwise() -> None:
    unlimited = TierLimits("unlimited", paid=RateLimits(), free=RateLimits())
    for free_model in (False, True):
        assert resolve_scope("key_x", unlimited, RateLimits(), free_model=free_model).limits == RateLimits()
        limited = resolve_scope(
            "key_x", unlimited, RateLimits(max_concurrent_requests=2), free_model=free_model
        )
        assert limited.limits == RateLimits(max_concurrent_requests=2)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.02, "20ms"),
        (0.0, "0ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (59.75, "59.75s"),
        (60.0, "1m0s"),
        (361.0, "6m1s"),
    ],
)
def test_reset_durations_use_openais_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
