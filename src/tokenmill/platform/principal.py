"""Who is calling: a user's key (`KeyPrincipal`) or an operator's (`AdminPrincipal`), as `auth` resolves them.
Apart from `auth` so the modules that take a principal (keys, tiers, billing) need not import the module
that builds one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tokenmill.platform.ratelimit import RateLimits, TierLimits


@dataclass(frozen=True, slots=True)
class KeyPrincipal:
    """Who is calling, as of this request: the key, its user and organization, and its grants."""

    key_id: str
    key_prefix: str
    org_id: str
    user_id: str
    tier: str
    allowed_models: frozenset[str] | None
    """None: any model."""
    spend_limit_micros: int | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent_requests: int | None
    expires_at: datetime | None
    tier_limits: TierLimits | None = None
    """The tier's row as of this request, joined in by `authenticate` so admission needs no query of its
    own; None for a principal built otherwise (`tiers.effective_limits` then reads the tier)."""

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    @property
    def overrides(self) -> RateLimits:
        """The key's own rate limits; None in a dimension leaves the tier's."""
        return RateLimits(self.requests_per_minute, self.tokens_per_minute, self.max_concurrent_requests)


@dataclass(frozen=True, slots=True)
class AdminPrincipal:
    key_id: str
    key_prefix: str
    name: str
