"""Typed errors of the platform layer. `serving/` maps each family to one HTTP status and OpenAI error body;
the classes carry what that mapping needs and nothing that would leak whether a key exists."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.platform.ratelimit import RateLimitDecision, RateLimitScope


class PlatformError(ValueError):
    """Base of every error the platform raises on purpose."""


# --- authentication: all map to one 401 with the same message ------------------------------------


class AuthenticationError(PlatformError):
    """The request carries no usable key. Subclasses exist for logs and tests; clients see one 401."""

    public_message = "Incorrect API key provided."


class MissingKey(AuthenticationError):
    pass


class MalformedKey(AuthenticationError):
    pass


class UnknownKey(AuthenticationError):
    pass


class RevokedKey(AuthenticationError):
    pass


class ExpiredKey(AuthenticationError):
    pass


# --- authorization: 403 ---------------------------------------------------------------------------


class PermissionDenied(PlatformError):
    """An authenticated key asks for something outside its grant."""


class ModelNotAllowed(PermissionDenied):
    def __init__(self, model: str) -> None:
        super().__init__(f"model: this API key may not use {model!r}")
        self.model = model


# --- quota: 429 insufficient_quota ----------------------------------------------------------------


class InsufficientQuota(PlatformError):
    """The worst-case cost of a request does not fit the account balance or the key's spend limit."""

    def __init__(self, reason: str, needed_micros: int, available_micros: int) -> None:
        what = "account balance" if reason == "balance" else "API key spend limit"
        super().__init__(
            f"You exceeded your current quota: the request may cost up to {needed_micros} micros and the "
            f"{what} has {available_micros} micros available."
        )
        self.reason = reason
        """"balance" or "key_spend_limit"."""
        self.needed_micros = needed_micros
        self.available_micros = available_micros


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


# --- bad input and missing things: 400 / 404 / 409 ------------------------------------------------


class InvalidAmount(PlatformError):
    """A money amount that is not a positive integer of micros (or out of range)."""


class InvalidArgument(PlatformError):
    """Any other malformed argument; the message names the field."""


class NotFound(PlatformError):
    """A referenced row does not exist (or, for keys, is not visible to the caller's organization)."""


class UnknownOrganization(NotFound):
    pass


class UnknownUser(NotFound):
    pass


class KeyNotFound(NotFound):
    pass


class UnknownTier(NotFound):
    pass


class ModelNotPriced(NotFound):
    """Requests for a model without a price are refused rather than served for free by accident."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model: {model!r} has no price; set one with `tokenmill admin set-price`")
        self.model = model


class Conflict(PlatformError):
    """The write contradicts an existing row (duplicate name, reused idempotency key, closed reservation)."""


class DuplicateName(Conflict):
    pass


class IdempotencyConflict(Conflict):
    """An idempotency key was reused for a different top-up."""


class ReservationClosed(Conflict):
    """settle/release on a reservation that is no longer open: nothing is charged twice."""
