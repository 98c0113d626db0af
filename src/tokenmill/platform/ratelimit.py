"""Rate limits per key: requests and tokens per fixed one-minute window plus concurrent requests.
Holds the limits, the one rule that gives a request its limits (`resolve_scope`: the organization's tier, then
the key's own overrides), the decision (with OpenAI's x-ratelimit-* values), the `RateLimiter` contract and
the heartbeat that keeps a live gateway's concurrency leases; backends live in `ratelimit_memory.py` and
`ratelimit_redis.py`, the tiers' rows in `tiers.py`."""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Protocol

from tokenmill.platform.errors import InvalidArgument, PlatformError

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
"""Fixed windows aligned to the epoch (floor(now / 60 s)); a burst can reach 2x the limit across a
window boundary, the usual price of O(1) state per key."""
CONCURRENCY_RETRY_S = 1.0
"""Retry-After hint when only the concurrency limit refuses: slots free when requests finish."""
LEASE_TTL_S = 30.0
"""A concurrency slot not refreshed for this long frees itself: its gateway died and did not come back."""
LEASE_REFRESH_S = LEASE_TTL_S / 3
"""How often a live gateway refreshes its leases: two refreshes may fail in a row before a slot is lost."""

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")
"""The dimensions of a limit, named as the key's override columns."""
LIMIT_UNITS = {
    "requests_per_minute": "requests per minute",
    "tokens_per_minute": "tokens per minute",
    "max_concurrent_requests": "concurrent requests",
}


@dataclass(frozen=True, slots=True)
class RateLimits:
    """None means unlimited in that dimension."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None

    def __post_init__(self) -> None:
        for name in LIMIT_FIELDS:
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise InvalidArgument(f"{name}: must be a positive integer or None")


@dataclass(frozen=True, slots=True)
class TierLimits:
    """One rate-limit tier (a row of `rate_limit_tiers`): the per-key limits of the organizations on it."""

    name: str
    paid: RateLimits
    """For models with a price."""
    free: RateLimits
    """For free models (price 0/0); counted apart from the paid ones."""


@dataclass(frozen=True, slots=True)
class RateLimitScope:
    """The limits one request is held to, the counter it counts in, and where each limit comes from."""

    bucket: str
    """The counter key: one per API key, and a separate one for its use of free models."""
    limits: RateLimits
    free_model: bool
    tier: str
    key_overrides: frozenset[str]
    """The dimensions (of `LIMIT_FIELDS`) the key's own overrides set; the others are the tier's."""

    def source(self, dimension: str) -> str:
        return "key" if dimension in self.key_overrides else f"tier {self.tier}"

    def describe(self, dimension: str) -> str:
        """E.g. "this API key's limit of 3 concurrent requests for free models": says, in a refusal, which
        limit refused and whom to ask about it."""
        value = getattr(self.limits, dimension)
        owner = "this API key's" if dimension in self.key_overrides else f"the {self.tier!r} tier's"
        amount = "unlimited" if value is None else f"{value:,}"
        models = "free" if self.free_model else "paid"
        return f"{owner} limit of {amount} {LIMIT_UNITS[dimension]} for {models} models"


def resolve_scope(
    key_id: str, tier: TierLimits, overrides: RateLimits, *, free_model: bool
) -> RateLimitScope:
    """The rule, the only one: the tier's limits for free or for paid models, then every dimension the key
    sets explicitly replaces the tier's, on free and paid models alike (a key's `max_concurrent_requests=3`
    means 3 in flight, whatever the tier says). Admission and `tiers.effective_limits` both call this."""
    base = tier.free if free_model else tier.paid
    overridden = frozenset(name for name in LIMIT_FIELDS if getattr(overrides, name) is not None)
    limits = RateLimits(
        **{name: getattr(overrides if name in overridden else base, name) for name in LIMIT_FIELDS}
    )
    return RateLimitScope(
        bucket=f"{key_id}:free" if free_model else key_id,
        limits=limits,
        free_model=free_model,
        tier=tier.name,
        key_overrides=overridden,
    )


@dataclass(frozen=True, slots=True)
class EffectiveLimits:
    """A key's limits on paid and on free models, as admission applies them."""

    paid: RateLimitScope
    free: RateLimitScope


@dataclass(frozen=True, slots=True)
class Lease:
    """Proof of an admitted request; give it back to `release` when the request ends."""

    bucket: str
    lease_id: str
    owner: str
    """The gateway id whose process holds the slot: it refreshes it, and releases it when it restarts."""
    window_index: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    allowed: bool
    reason: str | None
    """None when allowed; else "requests", "tokens", "concurrency" or "request_too_large" (can never fit)."""
    limit_requests: int | None
    remaining_requests: int | None
    reset_requests_s: float | None
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_tokens_s: float | None
    retry_after_s: float | None
    """When to try again (denials only); None for allowed and for requests that can never fit."""
    lease: Lease | None
    asked_tokens: int
    """The tokens this request asked to count (prompt + max_tokens): a refusal says how far over it is."""

    def headers(self) -> dict[str, str]:
        """OpenAI's response headers; only the limited dimensions appear."""
        out: dict[str, str] = {}
        for kind, limit, remaining, reset in (
            ("requests", self.limit_requests, self.remaining_requests, self.reset_requests_s),
            ("tokens", self.limit_tokens, self.remaining_tokens, self.reset_tokens_s),
        ):
            if limit is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
                out[f"x-ratelimit-reset-{kind}"] = format_duration(reset or 0.0)
        if self.retry_after_s is not None:
            out["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
            out["retry-after-ms"] = str(math.ceil(self.retry_after_s * 1000))
        return out


class RateLimiter(Protocol):
    """Contract of every backend. One limiter serves one gateway process and acts for its `owner` (the
    gateway id, stable across restarts and distinct between gateways).

    - `acquire` is atomic: either it counts one request, `num_tokens` tokens and one concurrency slot in
      `bucket`, or (denied) it counts nothing. The slot is a lease owned by `owner`.
    - Tokens are counted at admission (prompt + max_tokens, like OpenAI); `release(lease, unused_tokens)`
      gives back what was not generated, if the window is still current.
    - `release` is idempotent per lease, from any process.
    - A lease expires `LEASE_TTL_S` after it was acquired or last refreshed. `refresh_leases` moves the
      expiry of every lease this limiter acquired and has not released to now + TTL (a `LeaseHeartbeat`
      calls it every `LEASE_REFRESH_S`); it never revives a lease already released or expired. So a
      request keeps its slot as long as its process lives, and a process that dies frees its slots within
      one TTL.
    - `release_previous_leases` frees the slots still held under `owner` by an earlier process (a crashed
      run of the same gateway) and gives back nothing else; leases of other owners are untouched. It is
      called once, before the first `acquire`, so every lease it finds is abandoned. A backend whose state
      dies with the process finds none.
    - Time comes from the backend's injected clock, never from sleeping."""

    def acquire(self, bucket: str, limits: RateLimits, num_tokens: int) -> RateLimitDecision: ...

    def release(self, lease: Lease, unused_tokens: int = 0) -> None: ...

    def refresh_leases(self) -> int:
        """-> the number of leases this limiter still holds."""
        ...

    def release_previous_leases(self) -> int:
        """-> the number of slots freed."""
        ...


class LeaseHeartbeat:
    """Refreshes a limiter's leases from a daemon thread every `period_s`, from `start()` to `stop()`. A
    failed refresh (Redis briefly unreachable) is logged and retried at the next beat: the leases survive
    until their TTL, so only failures for a whole TTL lose slots (and then over-admit, never block)."""

    def __init__(self, limiter: RateLimiter, period_s: float = LEASE_REFRESH_S) -> None:
        self.limiter = limiter
        self.period_s = period_s
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="rate-limit-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopped.wait(self.period_s):
            try:
                self.limiter.refresh_leases()
            except Exception:
                logger.warning("refreshing the rate-limit leases failed; retrying", exc_info=True)


def window_index(now_ms: int, window_ms: int) -> int:
    return now_ms // window_ms


def decide(
    verdict: str,
    limits: RateLimits,
    *,
    num_requests: int,
    num_tokens: int,
    asked_tokens: int,
    now_ms: int,
    window_ms: int,
    lease: Lease | None,
) -> RateLimitDecision:
    """Shared by the backends: the window's counts (after the request if allowed) and what the request asked
    -> the decision and headers."""
    until_window_end_s = ((window_index(now_ms, window_ms) + 1) * window_ms - now_ms) / 1000
    retry = {"requests": until_window_end_s, "tokens": until_window_end_s, "concurrency": CONCURRENCY_RETRY_S}
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    return RateLimitDecision(
        allowed=verdict == "ok",
        reason=None if verdict == "ok" else verdict,
        limit_requests=rpm,
        remaining_requests=None if rpm is None else max(rpm - num_requests, 0),
        reset_requests_s=None if rpm is None else (until_window_end_s if num_requests else 0.0),
        limit_tokens=tpm,
        remaining_tokens=None if tpm is None else max(tpm - num_tokens, 0),
        reset_tokens_s=None if tpm is None else (until_window_end_s if num_tokens else 0.0),
        retry_after_s=retry.get(verdict),
        lease=lease if verdict == "ok" else None,
        asked_tokens=asked_tokens,
    )


def check_num_tokens(num_tokens: int) -> None:
    if type(num_tokens) is not int or num_tokens < 0:
        raise InvalidArgument("num_tokens: must be a non-negative integer")


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s", "1.5s"."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    secs = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class RateLimited(PlatformError):
    """429 rate_limit_exceeded; `decision.headers()` carries the x-ratelimit-* values and Retry-After. A
    request larger than the per-minute token limit (reason "request_too_large") can never be served: no
    Retry-After, and the HTTP layer answers it with a 400. The message names the limit that refused, and
    whether it is the key's own or its organization's tier's (`scope`)."""

    def __init__(self, decision: RateLimitDecision, scope: RateLimitScope, *, prompt_tokens: int) -> None:
        super().__init__(_rate_limit_message(decision, scope, prompt_tokens))
        self.decision = decision
        self.scope = scope


def _rate_limit_message(decision: RateLimitDecision, scope: RateLimitScope, prompt_tokens: int) -> str:
    asked = decision.asked_tokens
    if decision.reason == "request_too_large":
        limit = scope.limits.tokens_per_minute or 0
        completion = asked - prompt_tokens
        split = f" (prompt {prompt_tokens:,} + max_tokens {completion:,})" if completion else ""
        cure = "lower max_tokens" if completion and prompt_tokens < limit else "shorten the input"
        return (
            f"This request needs {asked:,} tokens{split}, more than {scope.describe('tokens_per_minute')}; "
            f"{cure} or ask for a higher limit."
        )
    if decision.reason == "tokens":
        remaining = decision.remaining_tokens or 0
        return (
            f"Rate limit reached for tokens per minute: this request needs {asked:,} tokens and {remaining:,} "
            f"remain this minute under {scope.describe('tokens_per_minute')}."
        )
    if decision.reason == "requests":
        return f"Rate limit reached for requests per minute: {scope.describe('requests_per_minute')}."
    if decision.reason == "concurrency":
        return f"Too many concurrent requests: {scope.describe('max_concurrent_requests')}."
    return "Rate limit reached."
