"""The sequence `serving/` runs around one billed engine request: `admit` (model grant, rate limit,
reserve) before any token is generated, then exactly one of `finish` (settle) or `abort` (release)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.platform.auth import KeyPrincipal, authorize_model
from tokenmill.platform.billing import (
    DEFAULT_OWNER,
    Reservation,
    UsageInfo,
    UsageStatus,
    release,
    reserve,
    settle,
)
from tokenmill.platform.db import Database
from tokenmill.platform.errors import RateLimited
from tokenmill.platform.pricing import get_model_price
from tokenmill.platform.ratelimit import Lease, RateLimitDecision, RateLimiter, resolve_scope
from tokenmill.platform.tiers import principal_tier


@dataclass(frozen=True, slots=True)
class Admission:
    principal: KeyPrincipal
    reservation: Reservation
    rate_limit: RateLimitDecision
    """Its `headers()` go on the response."""

    @property
    def lease(self) -> Lease:
        assert self.rate_limit.lease is not None  # an allowed decision always carries its lease
        return self.rate_limit.lease


class AdmissionControl:
    """Stateless apart from its collaborators; one per gateway process, shared by all requests."""

    def __init__(
        self,
        db: Database,
        limiter: RateLimiter,
        *,
        owner: str = DEFAULT_OWNER,
    ) -> None:
        self.db = db
        self.limiter = limiter
        self.owner = owner
        """This gateway's name on its reservations (see `recover_open_reservations`)."""

    def admit(self, principal: KeyPrincipal, model: str, prompt_tokens: int, max_tokens: int) -> Admission:
        """Raises, in this order: ModelNotAllowed (403), ModelNotPriced (404), RateLimited (429 with
        headers), InsufficientQuota (429 insufficient_quota). Nothing is held when it raises. `max_tokens` is
        the request's whole completion budget (n x max_tokens)."""
        authorize_model(principal, model)
        price = get_model_price(self.db, model)
        tier = principal_tier(self.db, principal)
        scope = resolve_scope(principal.key_id, tier, principal.overrides, free_model=price.is_free)
        decision = self.limiter.acquire(scope.bucket, scope.limits, prompt_tokens + max_tokens)
        if not decision.allowed or decision.lease is None:
            raise RateLimited(decision, scope, prompt_tokens=prompt_tokens)
        try:
            reservation = reserve(self.db, principal, model, prompt_tokens, max_tokens, owner=self.owner)
        except BaseException:
            self.limiter.release(decision.lease, unused_tokens=prompt_tokens + max_tokens)
            raise
        return Admission(principal=principal, reservation=reservation, rate_limit=decision)

    def finish(
        self,
        admission: Admission,
        prompt_tokens: int,
        completion_tokens: int,
        status: UsageStatus | str,
        latency_s: float,
    ) -> UsageInfo:
        """Settle with the engine's final counts; also for dropped streams (`client_disconnected`: what was
        generated is charged) and engine failures (`error`: nothing is charged)."""
        try:
            return settle(self.db, admission.reservation, prompt_tokens, completion_tokens, status, latency_s)
        finally:
            asked = admission.reservation.prompt_tokens + admission.reservation.max_tokens
            self.limiter.release(
                admission.lease, unused_tokens=max(asked - prompt_tokens - completion_tokens, 0)
            )

    def abort(self, admission: Admission) -> None:
        """The request never reached the engine (e.g. no replica had room): release everything."""
        try:
            release(self.db, admission.reservation)
        finally:
            self.limiter.release(admission.lease, unused_tokens=admission.lease.num_tokens)
