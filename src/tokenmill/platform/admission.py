"""The sequence `serving/` runs around one billed engine request: `resolve` (the key's model grant, then
the listing this caller may call), `admit` (rate limit, reserve) before any token is generated, then exactly
one of `finish` (settle) or `abort` (release). Resolution is apart so the caller can route the request (and
answer 404 or 503) before anything is held."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from tokenmill.platform.audit import record_foreign_access
from tokenmill.platform.auth import authorize_model
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
from tokenmill.platform.errors import InvalidArgument, ModelNotFound
from tokenmill.platform.listings import DEFAULT_PLATFORM_FEE_BPS, ListingInfo, provider_of, resolve_listing
from tokenmill.platform.pricing import BPS_PER_UNIT
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.platform.ratelimit import Lease, RateLimitDecision, RateLimited, RateLimiter, resolve_scope
from tokenmill.platform.tiers import principal_tier


@dataclass(frozen=True, slots=True)
class Admission:
    principal: KeyPrincipal
    reservation: Reservation
    rate_limit: RateLimitDecision | None
    """Its `headers()` go on the response; None for work admitted outside the rate limits (batch lines)."""

    @property
    def lease(self) -> Lease | None:
        return None if self.rate_limit is None else self.rate_limit.lease


class AdmissionControl:
    """Stateless apart from its collaborators; one per gateway process, shared by all requests."""

    def __init__(
        self,
        db: Database,
        limiter: RateLimiter,
        *,
        owner: str = DEFAULT_OWNER,
        default_fee_bps: int = DEFAULT_PLATFORM_FEE_BPS,
    ) -> None:
        if type(default_fee_bps) is not int or not 0 <= default_fee_bps <= BPS_PER_UNIT:
            raise InvalidArgument(f"platform_fee_bps: must be an integer from 0 to {BPS_PER_UNIT}")
        self.db = db
        self.limiter = limiter
        self.owner = owner
        """This gateway's name on its reservations (see `recover_open_reservations`)."""
        self.default_fee_bps = default_fee_bps
        """The platform's share of a provider's sale when its listing sets none."""

    def resolve(self, principal: KeyPrincipal, model: str) -> ListingInfo:
        """The listing this request is for. Raises, in this order: ModelNotAllowed (403: the key's
        allow-list), ModelNotFound (404, one message whatever the reason), ListingRetired (410, to the
        provider's own keys only). Reaching for another organization's model (a private fine-tune, say) is
        recorded in the audit log."""
        authorize_model(principal, model)
        try:
            return resolve_listing(self.db, principal.org_id, model)
        except ModelNotFound:
            provider = provider_of(self.db, model)
            if provider is not None and provider != principal.org_id:
                record_foreign_access(self.db, principal, "model", model, owner_org_id=provider)
            raise

    def admit(
        self,
        principal: KeyPrincipal,
        listing: ListingInfo,
        prompt_tokens: int,
        max_tokens: int,
        *,
        rate_limited: bool = True,
    ) -> Admission:
        """Admit a request for `listing` (from `resolve`, at its price and terms as resolved: no second
        read). Raises RateLimited (429 with headers), then InsufficientQuota (429 insufficient_quota);
        nothing is held when it raises. `max_tokens` is the request's whole completion budget
        (n x max_tokens). Batch lines pass `rate_limited=False`: their pace is the batch dispatcher's, and
        they must not take the key's live requests' share of its limits (the balance still holds them)."""
        if not rate_limited:
            reservation = self._reserve(principal, listing, prompt_tokens, max_tokens)
            return Admission(principal=principal, reservation=reservation, rate_limit=None)
        tier = principal_tier(self.db, principal)
        scope = resolve_scope(principal.key_id, tier, principal.overrides, free_model=listing.price.is_free)
        decision = self.limiter.acquire(scope.bucket, scope.limits, prompt_tokens + max_tokens)
        if not decision.allowed or decision.lease is None:
            raise RateLimited(decision, scope, prompt_tokens=prompt_tokens)
        try:
            reservation = self._reserve(principal, listing, prompt_tokens, max_tokens)
        except BaseException:
            self.limiter.release(decision.lease, unused_tokens=prompt_tokens + max_tokens)
            raise
        return Admission(principal=principal, reservation=reservation, rate_limit=decision)

    def _reserve(
        self, principal: KeyPrincipal, listing: ListingInfo, prompt_tokens: int, max_tokens: int
    ) -> Reservation:
        return reserve(
            self.db,
            principal,
            listing,
            prompt_tokens,
            max_tokens,
            owner=self.owner,
            fee_bps=listing.fee_bps(self.default_fee_bps),
        )

    def finish(
        self,
        admission: Admission,
        prompt_tokens: int,
        completion_tokens: int,
        status: UsageStatus | str,
        latency_s: float,
        *,
        also: Callable[[Session], None] | None = None,
    ) -> UsageInfo:
        """Settle with the engine's final counts; also for dropped streams (`client_disconnected`: what was
        generated is charged) and engine failures (`error`: nothing is charged). `also`: see `settle`."""
        try:
            return settle(
                self.db, admission.reservation, prompt_tokens, completion_tokens, status, latency_s, also=also
            )
        finally:
            if admission.lease is not None:
                asked = admission.reservation.prompt_tokens + admission.reservation.max_tokens
                self.limiter.release(
                    admission.lease, unused_tokens=max(asked - prompt_tokens - completion_tokens, 0)
                )

    def abort(self, admission: Admission) -> None:
        """The request never reached the engine (e.g. no replica had room): release everything."""
        try:
            release(self.db, admission.reservation)
        finally:
            if admission.lease is not None:
                self.limiter.release(admission.lease, unused_tokens=admission.lease.num_tokens)
