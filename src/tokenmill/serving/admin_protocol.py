"""Bodies of the operator's API under /v1/admin. Requests are strict (no "10" for 10) and refuse unknown
fields, so a misspelt field can never be silently ignored by a call that moves money or changes limits;
amounts in requests are integer micros. Responses show money twice, like the account API: exact integer
micros for programs and a decimal string in currency units for people. Times are Unix seconds."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenmill.platform.keys import LATEST_EXPIRY, MAX_ALLOWED_MODELS, MAX_SPEND_LIMIT_MICROS
from tokenmill.platform.ledger import MAX_ENTRY_MICROS
from tokenmill.platform.listing_terms import (
    MAX_DESCRIPTION_CHARS,
    MAX_MODEL_CHARS,
    MAX_SHARED_WITH,
    MAX_TAG_CHARS,
    MAX_TAGS,
)
from tokenmill.platform.pricing import BPS_PER_UNIT, MAX_PRICE_MICROS_PER_MTOK
from tokenmill.platform.validation import MAX_COUNT
from tokenmill.serving.account_protocol import ApiKeyObject, RateLimitValues, UsageEntry
from tokenmill.serving.catalog_protocol import Pricing

Name = Annotated[str, Field(min_length=1, max_length=200)]
OrgRef = Annotated[str, Field(min_length=1, max_length=200, description="An organization's id or name.")]
UserRef = Annotated[str, Field(min_length=1, max_length=320, description="A user's id or email.")]
TierName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
Limit = Annotated[int, Field(ge=1, le=MAX_COUNT)]
PriceMicros = Annotated[int, Field(ge=0, le=MAX_PRICE_MICROS_PER_MTOK)]


class AdminRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- organizations and users -------------------------------------------------------------------------


class CreateOrganizationRequest(AdminRequest):
    name: Name
    tier: TierName = "default"


class UpdateOrganizationRequest(AdminRequest):
    tier: TierName


class OrganizationObject(BaseModel):
    object: Literal["organization"] = "organization"
    id: str
    name: str
    tier: str
    created_at: int
    balance_micros: int
    """The sum of the organization's ledger."""
    balance: str


class OrganizationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OrganizationObject]


class CreateUserRequest(AdminRequest):
    org: OrgRef
    email: Annotated[str, Field(min_length=1, max_length=320)]
    name: str = Field("", max_length=200)
    """Empty: the email."""


class UserObject(BaseModel):
    object: Literal["user"] = "user"
    id: str
    org_id: str
    email: str
    name: str
    created_at: int


class UserList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UserObject]


# -- keys and money ----------------------------------------------------------------------------------


class CreateAdminKeyRequest(AdminRequest):
    """Unlike `POST /v1/keys`, the operator may grant anything, including per-key rate limits."""

    user: UserRef
    name: str = Field("", max_length=200)
    allowed_models: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, min_length=1, max_length=MAX_ALLOWED_MODELS
    )
    spend_limit_micros: int | None = Field(None, ge=0, le=MAX_SPEND_LIMIT_MICROS)
    expires_at: int | None = Field(None, ge=0, le=int(LATEST_EXPIRY.timestamp()))
    """Unix seconds; in the future."""
    requests_per_minute: Limit | None = None
    """None: the tier's."""
    tokens_per_minute: Limit | None = None
    max_concurrent_requests: Limit | None = None


class AdminKeyObject(ApiKeyObject):
    org_id: str


class CreatedAdminKey(AdminKeyObject):
    key: str
    """The secret, in this response only."""


class AdminKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdminKeyObject]


class TopUpRequest(AdminRequest):
    amount_micros: int = Field(ge=1, le=MAX_ENTRY_MICROS)
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)]
    """A unique name for this payment: repeating the request with it writes nothing."""
    note: str = Field("", max_length=500)


class TopUpObject(BaseModel):
    object: Literal["top_up"] = "top_up"
    id: int
    """The ledger entry's id."""
    org_id: str
    amount_micros: int
    amount: str
    idempotency_key: str
    note: str
    created: bool
    """False: the idempotency key had already paid this same amount; nothing was written this time."""
    created_at: int
    balance_micros: int
    """The organization's balance after the top-up."""
    balance: str


# -- prices and tiers --------------------------------------------------------------------------------


class PriceRequest(AdminRequest):
    """Micros per 1M tokens; 0 and 0 make the model free (and subject to the tiers' free-model limits)."""

    input_micros_per_mtok: PriceMicros
    output_micros_per_mtok: PriceMicros


class PriceObject(BaseModel):
    object: Literal["model_price"] = "model_price"
    model: str
    pricing: Pricing


class PriceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PriceObject]


class TierRequest(AdminRequest):
    """Each field given is set (null: unlimited); a field left out comes from `copy_from` if given, else
    keeps the tier's value (a new tier copies `default`)."""

    requests_per_minute: Limit | None = None
    tokens_per_minute: Limit | None = None
    max_concurrent_requests: Limit | None = None
    free_requests_per_minute: Limit | None = None
    free_tokens_per_minute: Limit | None = None
    free_max_concurrent_requests: Limit | None = None
    copy_from: TierName | None = None


class TierObject(BaseModel):
    object: Literal["rate_limit_tier"] = "rate_limit_tier"
    name: str
    paid_models: RateLimitValues
    free_models: RateLimitValues
    num_organizations: int


class TierList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TierObject]


# -- the model square ---------------------------------------------------------------------------------


class ListingRequest(AdminRequest):
    """A whole listing: `POST /v1/admin/listings` creates it or replaces every field with these (a retired
    listing stays retired; publish it to bring it back)."""

    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_CHARS)]
    task: Literal["chat", "embedding"] = "chat"
    display_name: Name | None = None
    """None: the model id."""
    description: str = Field("", max_length=MAX_DESCRIPTION_CHARS)
    provider: OrgRef | None = None
    """The providing organization; None: the platform itself (no revenue share)."""
    tags: list[Annotated[str, Field(min_length=1, max_length=MAX_TAG_CHARS)]] = Field([], max_length=MAX_TAGS)
    license: str = Field("", max_length=100)
    context_length: Limit | None = None
    price: PriceRequest | None = None
    """None: keep the model's price (free when it has none yet)."""
    visibility: Literal["public", "private", "shared"] = "public"
    shared_with: list[OrgRef] = Field([], max_length=MAX_SHARED_WITH)
    """With visibility `shared` only (and then at least one): organization ids or names."""
    status: Literal["draft", "published", "retired"] = "published"
    platform_fee_bps: int | None = Field(None, ge=0, le=BPS_PER_UNIT)
    """The platform's share of each sale in basis points; None: the server's default."""


class ListingUpdateRequest(AdminRequest):
    """A field left out (or null) stays as it is. Changing the visibility away from `shared` drops
    `shared_with`."""

    description: Annotated[str, Field(max_length=MAX_DESCRIPTION_CHARS)] | None = None
    price: PriceRequest | None = None
    visibility: Literal["public", "private", "shared"] | None = None
    shared_with: Annotated[list[OrgRef], Field(max_length=MAX_SHARED_WITH)] | None = None


class ListingObject(BaseModel):
    object: Literal["listing"] = "listing"
    model: str
    provider_org_id: str | None
    """None: the platform's own model."""
    provider: str
    display_name: str
    description: str
    task: str
    tags: list[str]
    license: str
    context_length: int | None
    status: str
    visibility: str
    shared_with: list[str]
    """Organization ids."""
    pricing: Pricing
    platform_fee_bps: int | None
    """None: the server's default fee."""
    created_at: int
    updated_at: int


class ListingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ListingObject]


# -- reports -----------------------------------------------------------------------------------------


class AdminUsageEntry(UsageEntry):
    org_id: str


class AdminUsageList(BaseModel):
    object: Literal["list"] = "list"
    start_date: str
    end_date: str
    data: list[AdminUsageEntry]
    total_cost_micros: int
    total_cost: str


class EarningsEntry(BaseModel):
    date: str
    """UTC day, YYYY-MM-DD."""
    provider_org_id: str
    model: str
    num_requests: int
    prompt_tokens: int
    completion_tokens: int
    sales_micros: int
    """What buyers were charged: earnings_micros + platform_fee_micros, exactly."""
    sales: str
    earnings_micros: int
    """Credited to the provider's balance."""
    earnings: str
    platform_fee_micros: int
    platform_fee: str


class EarningsList(BaseModel):
    object: Literal["list"] = "list"
    start_date: str
    end_date: str
    data: list[EarningsEntry]
    total_sales_micros: int
    total_sales: str
    total_earnings_micros: int
    total_earnings: str
    total_platform_fee_micros: int
    total_platform_fee: str


# -- operations --------------------------------------------------------------------------------------


class ReleaseReservationsRequest(AdminRequest):
    """For a gateway that will not come back (a restarting one releases its own). At least one is needed,
    so a live gateway's requests are never released by accident."""

    gateway_id: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    older_than_minutes: int | None = Field(None, ge=1, le=100 * 366 * 24 * 60)


class ReleasedReservations(BaseModel):
    object: Literal["reservation_release"] = "reservation_release"
    released_ids: list[str]
    """Released without any charge."""


class AuditEntryObject(BaseModel):
    object: Literal["audit_entry"] = "audit_entry"
    id: int
    created_at: int
    actor: str
    """Who: `admin:<admin key id>` for this API, `cli:<os user>` for `tokenmill admin`."""
    action: str
    target: str
    before: Any
    after: Any


class AuditList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEntryObject]
    """Newest first; pass the last id as `before_id` for the next page."""
    has_more: bool
