"""/v1/admin, the model square and the money it moves: listings in every status (create or replace, edit,
publish, retire) through `platform.admin_ops`, like `tokenmill admin set-listing` and friends, and the usage
and providers' earnings reports. Same admin key and rules as `admin.py`."""

from __future__ import annotations

from datetime import date, timedelta

from fastapi import APIRouter
from fastapi.responses import Response

from tokenmill.platform import accounts, admin_ops, listings
from tokenmill.platform.db import Database
from tokenmill.platform.listing_terms import ListingChanges, ListingSpec
from tokenmill.platform.listings import ListingInfo
from tokenmill.platform.money import format_micros
from tokenmill.platform.pricing import Price
from tokenmill.platform.usage import provider_earnings, usage_report
from tokenmill.serving.admin_protocol import (
    AdminUsageEntry,
    AdminUsageList,
    EarningsEntry,
    EarningsList,
    ListingList,
    ListingObject,
    ListingRequest,
    ListingUpdateRequest,
    PriceRequest,
)
from tokenmill.serving.catalog_protocol import Pricing
from tokenmill.serving.deps import AdminDep, GatewayDep
from tokenmill.serving.openapi import documented
from tokenmill.serving.routes.account import DEFAULT_USAGE_DAYS
from tokenmill.serving.routes.admin import (
    READ,
    WRITE,
    OrgQuery,
    actor,
    seconds,
)
from tokenmill.serving.routes.common import json_response

router = APIRouter(prefix="/v1/admin")
_EARNINGS_SUMS = ("sales_micros", "earnings_micros", "platform_fee_micros")


def _listing(info: ListingInfo) -> ListingObject:
    return ListingObject(
        model=info.model,
        provider_org_id=info.provider_org_id,
        provider=info.provider,
        display_name=info.display_name,
        description=info.description,
        task=info.task,
        tags=list(info.tags),
        license=info.license,
        context_length=info.context_length,
        status=info.status,
        visibility=info.visibility,
        shared_with=list(info.shared_with),
        pricing=Pricing.of(info.price),
        platform_fee_bps=info.platform_fee_bps,
        created_at=seconds(info.created_at),
        updated_at=seconds(info.updated_at),
    )


def _price(body: PriceRequest | None) -> Price | None:
    return None if body is None else Price(body.input_micros_per_mtok, body.output_micros_per_mtok)


# -- listings ----------------------------------------------------------------------------------------------


@router.get("/listings", response_model=None, responses=documented(ListingList, *READ))
def list_listings(gateway: GatewayDep) -> Response:
    """Every listing in every status, by model id."""
    return json_response(ListingList(data=[_listing(info) for info in listings.list_listings(gateway.db)]))


@router.post("/listings", response_model=None, responses=documented(ListingObject, *WRITE, 404, 409))
def apply_listing(body: ListingRequest, admin: AdminDep, gateway: GatewayDep) -> Response:
    """Creates the listing of `model`, or replaces every field of it, with its price, in one change."""
    spec = ListingSpec(
        model=body.model,
        task=body.task,
        display_name=body.display_name,
        description=body.description,
        provider=body.provider,
        tags=tuple(body.tags),
        license=body.license,
        context_length=body.context_length,
        price=_price(body.price),
        visibility=body.visibility,
        shared_with=tuple(body.shared_with),
        status=body.status,
        platform_fee_bps=body.platform_fee_bps,
    )
    return json_response(_listing(admin_ops.apply_listing(gateway.db, actor(admin), spec)))


# Registered before the `{model:path}` routes: whatever methods those gain, ".../publish" is never a model id.
@router.post(
    "/listings/{model:path}/publish",
    response_model=None,
    responses=documented(ListingObject, *READ, 404, 409),
)
def publish_listing(model: str, admin: AdminDep, gateway: GatewayDep) -> Response:
    """A draft or retired listing becomes callable again (by whom its visibility says)."""
    return _set_status(gateway.db, actor(admin), model, "published")


@router.post(
    "/listings/{model:path}/retire",
    response_model=None,
    responses=documented(ListingObject, *READ, 404, 409),
)
def retire_listing(model: str, admin: AdminDep, gateway: GatewayDep) -> Response:
    """New requests for the model are refused; those already admitted finish at the terms they were quoted."""
    return _set_status(gateway.db, actor(admin), model, "retired")


def _set_status(db: Database, who: str, model: str, status: str) -> Response:
    return json_response(_listing(admin_ops.set_listing_status(db, who, model, status)))


@router.get("/listings/{model:path}", response_model=None, responses=documented(ListingObject, *READ, 404))
def get_listing(model: str, gateway: GatewayDep) -> Response:
    return json_response(_listing(listings.get_listing(gateway.db, model)))


@router.patch(
    "/listings/{model:path}", response_model=None, responses=documented(ListingObject, *WRITE, 404, 409)
)
def update_listing(model: str, body: ListingUpdateRequest, admin: AdminDep, gateway: GatewayDep) -> Response:
    changes = ListingChanges(
        description=body.description,
        price=_price(body.price),
        visibility=body.visibility,
        shared_with=None if body.shared_with is None else tuple(body.shared_with),
    )
    return json_response(_listing(admin_ops.update_listing(gateway.db, actor(admin), model, changes)))


# -- reports -----------------------------------------------------------------------------------------------


def _days(db: Database, start_date: date | None, end_date: date | None) -> tuple[date, date]:
    """Both inclusive, UTC; by default the last 30 days, as in `GET /v1/usage`."""
    end = end_date or db.now().date()
    return start_date or end - timedelta(days=DEFAULT_USAGE_DAYS - 1), end


@router.get("/usage", response_model=None, responses=documented(AdminUsageList, *READ, 404))
def get_usage(
    gateway: GatewayDep, org: OrgQuery = None, start_date: date | None = None, end_date: date | None = None
) -> Response:
    """Per UTC day, organization and model; every organization's unless `org` names one."""
    db = gateway.db
    start, end = _days(db, start_date, end_date)
    org_id = None if org is None else accounts.get_organization(db, org).id
    rows = usage_report(db, org_id, start, end)
    entries = [
        AdminUsageEntry(
            date=row.day.isoformat(),
            org_id=row.org_id,
            model=row.model,
            num_requests=row.num_requests,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            total_tokens=row.prompt_tokens + row.completion_tokens,
            cost_micros=row.cost_micros,
            cost=format_micros(row.cost_micros),
        )
        for row in rows
    ]
    total = sum(row.cost_micros for row in rows)
    return json_response(
        AdminUsageList(
            start_date=start.isoformat(),
            end_date=end.isoformat(),
            data=entries,
            total_cost_micros=total,
            total_cost=format_micros(total),
        )
    )


@router.get("/earnings", response_model=None, responses=documented(EarningsList, *READ, 404))
def get_earnings(
    gateway: GatewayDep,
    provider: OrgQuery = None,
    start_date: date | None = None,
    end_date: date | None = None,
) -> Response:
    """Sales of providers' models per UTC day, provider and model: what buyers paid, what the provider was
    credited and the platform's fee. Every provider's unless `provider` names one; the platform's own
    models have no provider and are not in it."""
    db = gateway.db
    start, end = _days(db, start_date, end_date)
    provider_id = None if provider is None else accounts.get_organization(db, provider).id
    rows = provider_earnings(db, provider_id, start, end)
    entries = [
        EarningsEntry(
            date=row.day.isoformat(),
            provider_org_id=row.provider_org_id,
            model=row.model,
            num_requests=row.num_requests,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            sales_micros=row.sales_micros,
            sales=format_micros(row.sales_micros),
            earnings_micros=row.earnings_micros,
            earnings=format_micros(row.earnings_micros),
            platform_fee_micros=row.platform_fee_micros,
            platform_fee=format_micros(row.platform_fee_micros),
        )
        for row in rows
    ]
    sales, earnings, fees = (sum(getattr(row, f) for row in rows) for f in _EARNINGS_SUMS)
    return json_response(
        EarningsList(
            start_date=start.isoformat(),
            end_date=end.isoformat(),
            data=entries,
            total_sales_micros=sales,
            total_sales=format_micros(sales),
            total_earnings_micros=earnings,
            total_earnings=format_micros(earnings),
            total_platform_fee_micros=fees,
            total_platform_fee=format_micros(fees),
        )
    )
