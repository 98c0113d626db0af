"""Bodies of the account API: /v1/user/info (shaped like SiliconCloud's), /v1/usage and /v1/keys. Money
appears twice: exact integer micros for programs, and a decimal string in currency units for people."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenmill.platform.keys import LATEST_EXPIRY, MAX_ALLOWED_MODELS, MAX_SPEND_LIMIT_MICROS


class OrganizationRef(BaseModel):
    id: str
    name: str
    tier: str


class ApiKeyRef(BaseModel):
    id: str
    prefix: str
    spend_limit_micros: int | None
    committed_micros: int
    """Spent plus held by requests in flight: what the spend limit caps."""


class RateLimitValues(BaseModel):
    """None: unlimited in that dimension."""

    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent_requests: int | None


class KeyRateLimits(BaseModel):
    """What this key is held to, exactly as admission applies it: its organization's tier, with the key's own
    overrides replacing a dimension; free models are limited and counted apart from paid ones."""

    tier: str
    paid_models: RateLimitValues
    free_models: RateLimitValues


class UserInfoData(BaseModel):
    id: str
    name: str
    email: str
    status: str = "normal"
    organization: OrganizationRef
    api_key: ApiKeyRef
    balance: str
    """The organization's balance (the sum of its ledger), in currency units."""
    available_balance: str
    """balance minus what requests in flight hold: what the next request may reserve."""
    balance_micros: int
    held_micros: int
    available_micros: int
    billing_enabled: bool
    """False under --no-auth: nothing is billed, every figure is zero."""
    rate_limits: KeyRateLimits


class UserInfoResponse(BaseModel):
    """SiliconCloud's envelope: {"code": 20000, "message": "OK", "status": true, "data": {...}}."""

    code: int = 20000
    message: str = "OK"
    status: bool = True
    data: UserInfoData


class UsageEntry(BaseModel):
    date: str
    """UTC day, YYYY-MM-DD."""
    model: str
    num_requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int
    """role=provider: what buyers were charged for the model (earnings + platform fee, exactly)."""
    cost: str
    earnings_micros: int | None = None
    """role=provider only: the organization's share, credited to its balance."""
    earnings: str | None = None
    platform_fee_micros: int | None = None


class UsageList(BaseModel):
    object: Literal["list"] = "list"
    role: Literal["buyer", "provider"] = "buyer"
    start_date: str
    end_date: str
    data: list[UsageEntry]
    total_cost_micros: int
    total_cost: str
    total_earnings_micros: int | None = None
    """role=provider only."""


class CreateKeyRequest(BaseModel):
    """Unknown fields are refused: a misspelt `spend_limit_micros` must not create an unlimited key."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field("", max_length=200)
    allowed_models: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, min_length=1, max_length=MAX_ALLOWED_MODELS
    )
    spend_limit_micros: int | None = Field(None, ge=0, le=MAX_SPEND_LIMIT_MICROS)
    expires_at: int | None = Field(None, ge=0, le=int(LATEST_EXPIRY.timestamp()))
    """Unix seconds; in the future."""


class ApiKeyObject(BaseModel):
    object: Literal["api_key"] = "api_key"
    id: str
    name: str
    prefix: str
    """The first characters of the key, enough to recognise it; the rest is never stored."""
    user_id: str
    allowed_models: list[str] | None
    spend_limit_micros: int | None
    created_at: int
    expires_at: int | None
    revoked_at: int | None
    last_used_at: int | None = None
    """Unix seconds of the key's newest billed request; None: never used (or a list that does not say)."""
    requests_per_minute: int | None = None
    """The key's own rate limits; None in a dimension: the organization's tier decides."""
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None


class CreatedApiKey(ApiKeyObject):
    key: str
    """The secret, in this response only."""


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyObject]


class RequestRecord(BaseModel):
    """One request as it was billed (`GET /v1/usage/requests`)."""

    object: Literal["usage.request"] = "usage.request"
    id: int
    """Pass the last one as `after` for the next page; a charge's `request_id` in the ledger names it."""
    created_at: int
    """Unix seconds, when it was settled."""
    model: str
    key_id: str
    key_prefix: str
    key_name: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int
    cost: str
    latency_ms: int
    status: str
    """ok, client_disconnected (billed for what was generated) or error (not billed)."""


class RequestList(BaseModel):
    object: Literal["list"] = "list"
    start_date: str
    end_date: str
    data: list[RequestRecord]
    has_more: bool
    last_id: int | None
    """The cursor: `after=last_id` asks for the next page."""


class LedgerEntryObject(BaseModel):
    object: Literal["ledger_entry"] = "ledger_entry"
    id: int
    created_at: int
    kind: str
    """topup, charge, refund, adjustment or earning (a provider's share of a sale)."""
    amount_micros: int
    """Signed: charges are negative."""
    amount: str
    note: str
    request_id: int | None = None
    """Charges: the `id` of the request charged in `GET /v1/usage/requests`."""
    model: str | None = None
    """Charges: the model of that request."""


class LedgerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LedgerEntryObject]
    has_more: bool
    last_id: int | None
    """The cursor: `after=last_id` asks for the next page."""
    balance_micros: int
    """The organization's balance now (the sum of its whole ledger)."""
    balance: str
