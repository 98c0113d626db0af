"""Bodies of the model square: /v1/catalog/models (browse, one listing, a provider's edit),
/v1/catalog/compare and a provider's own listings (/v1/provider/listings). Prices appear as exact integer micros per 1M tokens for programs and as decimal strings
for people, as everywhere in the account API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenmill.platform.listing_terms import MAX_DISPLAY_NAME_CHARS, MAX_TAG_CHARS, MAX_TAGS
from tokenmill.platform.money import format_micros
from tokenmill.platform.pricing import MAX_PRICE_MICROS_PER_MTOK, Price

MAX_SHARED_WITH = 100
MAX_DESCRIPTION = 4000


class Pricing(BaseModel):
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    input_per_1m: str
    """Currency units per 1M prompt tokens, e.g. "0.100000"."""
    output_per_1m: str
    free: bool

    @classmethod
    def of(cls, price: Price) -> Pricing:
        return cls(
            input_micros_per_mtok=price.input_micros_per_mtok,
            output_micros_per_mtok=price.output_micros_per_mtok,
            input_per_1m=format_micros(price.input_micros_per_mtok),
            output_per_1m=format_micros(price.output_micros_per_mtok),
            free=price.is_free,
        )


class LiveFiguresBody(BaseModel):
    """Measured from this server's own traffic over the last `window_s` seconds; every figure is null when
    there was none (`has_traffic` false), never a stale or declared number."""

    window_s: int
    has_traffic: bool
    requests: int
    refused: int
    errors: int
    output_tokens_per_s_p50: float | None
    """Median decode speed of one stream, as one user sees it."""
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    error_rate: float | None
    availability: float | None


class ProviderView(BaseModel):
    """Only the listing's own provider sees how it is published."""

    status: str
    visibility: str
    shared_with: list[str]
    """Organization ids."""
    platform_fee_bps: int
    """The platform's share of each sale, in basis points (1/100 of a percent)."""


class ListingCard(BaseModel):
    """What a listing says of its model, as the catalog and the provider's own list both show it."""

    id: str
    display_name: str
    description: str
    provider: str
    task: str
    tags: list[str]
    license: str
    context_length: int | None
    pricing: Pricing
    batch_pricing: Pricing
    """What its tokens cost through the Batch API (the server's batch discount off `pricing`)."""


class CatalogModel(ListingCard):
    object: Literal["catalog.model"] = "catalog.model"
    state: str
    """loaded | loading | unloaded | draining | stopped | failed: whether a request is served at once, after
    a cold start, or not at all right now."""
    replicas: int | None = None
    """Engines serving the chat model right now: it may scale with demand, and 0 means the next request
    starts one (a cold start). None for an embedding model."""
    live: LiveFiguresBody
    yours: ProviderView | None = None


class CatalogPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[CatalogModel]
    total: int
    """Matches of the query in all; `data` is one page of them."""
    limit: int
    offset: int


class RequestCost(BaseModel):
    input_tokens: int
    output_tokens: int
    cost_micros: int
    cost: str


class ComparedModel(CatalogModel):
    request_cost: RequestCost | None = None
    """What a request of the given shape costs on this model (billing's own formula)."""


class Comparison(BaseModel):
    object: Literal["list"] = "list"
    data: list[ComparedModel]


class PriceChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input_micros_per_mtok: Annotated[int, Field(ge=0, le=MAX_PRICE_MICROS_PER_MTOK)]
    output_micros_per_mtok: Annotated[int, Field(ge=0, le=MAX_PRICE_MICROS_PER_MTOK)]


class ListingEdit(BaseModel):
    """What a provider may change about its own listing; a field left out stays as it is."""

    model_config = ConfigDict(extra="forbid", strict=True)

    description: Annotated[str, Field(max_length=MAX_DESCRIPTION)] | None = None
    pricing: PriceChange | None = None
    visibility: Literal["public", "private", "shared"] | None = None
    shared_with: Annotated[list[str], Field(max_length=MAX_SHARED_WITH)] | None = None
    """Organization ids (`org_...`, as `/v1/user/info` shows each organization its own)."""
    display_name: Annotated[str, Field(min_length=1, max_length=MAX_DISPLAY_NAME_CHARS)] | None = None
    tags: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=MAX_TAG_CHARS)]], Field(max_length=MAX_TAGS)
        ]
        | None
    ) = None
    """The whole new list; [] removes every tag."""
    status: Literal["published", "retired"] | None = None
    """`published` publishes a draft; `retired` retires a published listing: new requests are refused, those
    already admitted finish. Only the server's operator brings a retired listing back (409 otherwise)."""


class ProviderListing(ListingCard):
    """One of the caller's organization's own listings, in any status, whether or not this server serves
    it (so it has no live figures or state: see /v1/catalog/models for those)."""

    object: Literal["provider.listing"] = "provider.listing"
    yours: ProviderView
    """Status, visibility, who it is shared with and the platform's fee, as in the catalog."""
    created_at: int
    updated_at: int
    """Unix seconds."""


class ProviderListingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ProviderListing]
