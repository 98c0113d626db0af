"""The model square: browse what the caller may call (filters, free-text search, sort, pages), one listing,
a side-by-side comparison with the cost of a request shape, and, for a provider, its own listings in every
status and its edit of one (terms, publishing a draft, retiring). Each catalog listing carries its live
figures, measured from this server's traffic, and the model's current state."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from tokenmill.catalog.fleet_model import ModelState
from tokenmill.catalog.search import CatalogEntry, CatalogQuery, request_cost_micros, search
from tokenmill.platform.listing_terms import ListingChanges
from tokenmill.platform.listings import ListingInfo, own_listings, update_own_listing
from tokenmill.platform.money import format_micros, parse_units
from tokenmill.platform.pricing import Price, discounted
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.platform.validation import MAX_COUNT
from tokenmill.serving.catalog_protocol import (
    CatalogModel,
    CatalogPage,
    ComparedModel,
    Comparison,
    ListingEdit,
    LiveFiguresBody,
    Pricing,
    ProviderListing,
    ProviderListingList,
    ProviderView,
    RequestCost,
)
from tokenmill.serving.deps import GatewayDep, PrincipalDep, StateDep
from tokenmill.serving.errors import APIError, model_not_found
from tokenmill.serving.openapi import ALWAYS, documented
from tokenmill.serving.routes.common import json_response
from tokenmill.serving.state import ServingState

router = APIRouter()

MAX_COMPARED = 8


def _entry(state: ServingState, listing: ListingInfo) -> CatalogEntry:
    served = state.served.get(listing.model)
    if served is None:
        # A provider's edit of a listing that another gateway of the same database serves: this one has
        # no engine for it, so nothing is served from here.
        task, context_length, model_state = listing.task, listing.context_length, ModelState.STOPPED
    else:
        task, context_length = served.task, state.context_length(listing)
        model_state = state.model_state(listing.model)
    return CatalogEntry(
        model=listing.model,
        display_name=listing.display_name,
        description=listing.description,
        provider=listing.provider,
        task=task,
        tags=listing.tags,
        license=listing.license,
        context_length=context_length,
        input_micros_per_mtok=listing.price.input_micros_per_mtok,
        output_micros_per_mtok=listing.price.output_micros_per_mtok,
        state=model_state,
        live=state.live.figures(listing.model),
    )


def _provider_view(state: ServingState, listing: ListingInfo) -> ProviderView:
    default_fee = state.gateway.admission.default_fee_bps if state.gateway is not None else 0
    return ProviderView(
        status=listing.status,
        visibility=listing.visibility,
        shared_with=list(listing.shared_with),
        platform_fee_bps=listing.fee_bps(default_fee),
    )


def _body(state: ServingState, principal: KeyPrincipal, listing: ListingInfo) -> CatalogModel:
    entry = _entry(state, listing)
    yours = None
    if listing.provider_org_id is not None and listing.provider_org_id == principal.org_id:
        yours = _provider_view(state, listing)
    live = entry.live
    return CatalogModel(
        id=entry.model,
        display_name=entry.display_name,
        description=entry.description,
        provider=entry.provider,
        task=entry.task,
        tags=list(entry.tags),
        license=entry.license,
        context_length=entry.context_length,
        pricing=Pricing.of(listing.price),
        batch_pricing=Pricing.of(discounted(listing.price, state.tidal.settings.batch_discount_bps)),
        state=entry.state,
        replicas=_num_replicas(state, listing),
        live=LiveFiguresBody(
            window_s=live.window_s,
            has_traffic=live.has_traffic,
            requests=live.requests,
            refused=live.refused,
            errors=live.errors,
            output_tokens_per_s_p50=live.output_tokens_per_s_p50,
            ttft_p50_s=live.ttft_p50_s,
            ttft_p95_s=live.ttft_p95_s,
            error_rate=live.error_rate,
            availability=live.availability,
        ),
        yours=yours,
    )


def _num_replicas(state: ServingState, listing: ListingInfo) -> int | None:
    served = state.served.get(listing.model)
    if served is None or served.task != "chat":
        return None if served is not None else 0
    status = state.fleet.status_of(served.base_model or listing.model)
    return sum(not replica.draining for replica in status.replicas)


async def _visible(state: ServingState, principal: KeyPrincipal) -> dict[str, ListingInfo]:
    return {listing.model: listing for listing in await state.visible_listings(principal)}


@router.get("/v1/catalog/models", response_model=None, responses=documented(CatalogPage, *ALWAYS))
async def list_catalog(
    state: StateDep,
    principal: PrincipalDep,
    task: str | None = None,
    tag: str | None = None,
    provider: str | None = None,
    free: bool | None = None,
    max_output_price: Annotated[
        str | None, Query(description="Currency units per 1M output tokens, e.g. 0.5.", max_length=40)
    ] = None,
    min_context: Annotated[int | None, Query(ge=0, le=MAX_COUNT)] = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    sort: str = "name",
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_COUNT)] = 0,
) -> Response:
    query = CatalogQuery(
        task=task,
        tag=tag,
        provider=provider,
        free=free,
        max_output_price_micros=None
        if max_output_price is None
        else parse_units(max_output_price, "max_output_price", allow_zero=True),
        min_context=min_context,
        q=q,
        sort=sort,
        limit=limit,
        offset=offset,
    )
    visible = await _visible(state, principal)
    page, total = search((_entry(state, listing) for listing in visible.values()), query)
    return json_response(
        CatalogPage(
            data=[_body(state, principal, visible[entry.model]) for entry in page],
            total=total,
            limit=limit,
            offset=offset,
        )
    )


@router.get("/v1/catalog/compare", response_model=None, responses=documented(Comparison, *ALWAYS, 404))
async def compare(
    state: StateDep,
    principal: PrincipalDep,
    models: Annotated[str, Query(description="Model ids, comma-separated.", max_length=2000)],
    input_tokens: Annotated[int | None, Query(ge=0, le=MAX_COUNT)] = None,
    output_tokens: Annotated[int | None, Query(ge=0, le=MAX_COUNT)] = None,
) -> Response:
    wanted = list(dict.fromkeys(m.strip() for m in models.split(",") if m.strip()))
    if not 1 <= len(wanted) <= MAX_COMPARED:
        raise APIError(400, f"Give from 1 to {MAX_COMPARED} model ids, comma-separated.", param="models")
    visible = await _visible(state, principal)
    for model in wanted:
        if model not in visible:
            raise model_not_found(model)
    shape = (
        None if input_tokens is None and output_tokens is None else (input_tokens or 0, output_tokens or 0)
    )
    data = []
    for model in wanted:
        listing = visible[model]
        body = ComparedModel(**_body(state, principal, listing).model_dump())
        if shape is not None:
            cost = request_cost_micros(_entry(state, listing), *shape)
            body.request_cost = RequestCost(
                input_tokens=shape[0], output_tokens=shape[1], cost_micros=cost, cost=format_micros(cost)
            )
        data.append(body)
    return json_response(Comparison(data=data))


@router.get(
    "/v1/catalog/models/{model_id:path}",
    response_model=None,
    responses=documented(CatalogModel, *ALWAYS, 404),
)
async def retrieve_listing(model_id: str, state: StateDep, principal: PrincipalDep) -> Response:
    listing = (await _visible(state, principal)).get(model_id)
    if listing is None:
        raise model_not_found(model_id)
    return json_response(_body(state, principal, listing))


@router.patch(
    "/v1/catalog/models/{model_id:path}",
    response_model=None,
    responses=documented(CatalogModel, *ALWAYS, 403, 404, 409, 410, 413),
)
async def edit_listing(
    model_id: str, edit: ListingEdit, state: StateDep, principal: PrincipalDep, gateway: GatewayDep
) -> Response:
    """The provider's own listing only: anybody else's is a 404, exactly as if it did not exist. A retired
    listing answers 410, or 409 naming `status` to a request to change its status (only the operator brings
    it back); retiring a draft is a 409 too."""
    changes = ListingChanges(
        description=edit.description,
        price=None
        if edit.pricing is None
        else Price(edit.pricing.input_micros_per_mtok, edit.pricing.output_micros_per_mtok),
        visibility=edit.visibility,
        shared_with=None if edit.shared_with is None else tuple(edit.shared_with),
        display_name=edit.display_name,
        tags=None if edit.tags is None else tuple(edit.tags),
        status=edit.status,
    )
    listing = await run_in_threadpool(update_own_listing, gateway.db, principal.org_id, model_id, changes)
    return json_response(_body(state, principal, listing))


@router.get("/v1/provider/listings", response_model=None, responses=documented(ProviderListingList, *ALWAYS))
async def list_own_listings(state: StateDep, principal: PrincipalDep, gateway: GatewayDep) -> Response:
    """The caller's organization's own listings in every status (draft, published, retired), by model id,
    whether or not this server serves them: what its provider manages, where the catalog shows only what
    may be called."""
    listings = await run_in_threadpool(own_listings, gateway.db, principal.org_id)
    return json_response(
        ProviderListingList(data=[_provider_listing(state, listing) for listing in listings])
    )


def _provider_listing(state: ServingState, listing: ListingInfo) -> ProviderListing:
    served = state.served.get(listing.model)
    return ProviderListing(
        id=listing.model,
        display_name=listing.display_name,
        description=listing.description,
        provider=listing.provider,
        task=listing.task,
        tags=list(listing.tags),
        license=listing.license,
        context_length=listing.context_length or (served.context_length if served is not None else None),
        pricing=Pricing.of(listing.price),
        batch_pricing=Pricing.of(discounted(listing.price, state.tidal.settings.batch_discount_bps)),
        yours=_provider_view(state, listing),
        created_at=int(listing.created_at.timestamp()),
        updated_at=int(listing.updated_at.timestamp()),
    )
