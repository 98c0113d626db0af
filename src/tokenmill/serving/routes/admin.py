"""/v1/admin: the operator's API, with the admin key (`sk-admin-...`), doing over HTTP what `tokenmill admin`
does on the command line. Changes go through `platform.admin_ops`, the functions the CLI calls, so both keep
the same rules and each change writes its audit-log row (actor `admin:<admin key id>`); reads call the
platform's read functions. Organizations and users are named by id or by name/email, as on the command line.
The model square's routes (listings, usage, earnings) are in `admin_market.py`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from tokenmill.platform import accounts, admin_ops, audit, keys, ledger, pricing, tiers
from tokenmill.platform.accounts import OrgInfo, UserInfo
from tokenmill.platform.db import Database
from tokenmill.platform.keys import KeyInfo
from tokenmill.platform.money import format_micros
from tokenmill.platform.pricing import Price
from tokenmill.platform.principal import AdminPrincipal
from tokenmill.platform.ratelimit import RateLimits
from tokenmill.platform.tables import TIER_LIMIT_COLUMNS
from tokenmill.serving.account_protocol import RateLimitValues
from tokenmill.serving.admin_protocol import (
    AdminKeyList,
    AdminKeyObject,
    AuditEntryObject,
    AuditList,
    CreateAdminKeyRequest,
    CreatedAdminKey,
    CreateOrganizationRequest,
    CreateUserRequest,
    OrganizationList,
    OrganizationObject,
    PriceList,
    PriceObject,
    PriceRequest,
    ReleasedReservations,
    ReleaseReservationsRequest,
    TierList,
    TierObject,
    TierRequest,
    TopUpObject,
    TopUpRequest,
    UpdateOrganizationRequest,
    UserList,
    UserObject,
)
from tokenmill.serving.catalog_protocol import Pricing
from tokenmill.serving.deps import AdminDep, GatewayDep
from tokenmill.serving.openapi import ALWAYS, documented
from tokenmill.serving.routes.common import json_response
from tokenmill.serving.routes.keys import key_object

router = APIRouter(prefix="/v1/admin")

READ = (*ALWAYS, 403)
"""Any admin route: a user key is a 403 (and --no-auth a 400)."""
WRITE = (*READ, 413)
"""A route with a body."""
OrgQuery = Annotated[str | None, Query(min_length=1, max_length=200, description="An id or a name.")]


def actor(admin: AdminPrincipal) -> str:
    """Who the audit log says made a change through this API."""
    return f"admin:{admin.key_id}"


def seconds(moment: datetime) -> int:
    return int(moment.timestamp())


# -- organizations and users -------------------------------------------------------------------------------


def _org(db: Database, org: OrgInfo) -> OrganizationObject:
    balance = ledger.balance_micros(db, org.id)
    return OrganizationObject(
        id=org.id,
        name=org.name,
        tier=org.tier,
        created_at=seconds(org.created_at),
        balance_micros=balance,
        balance=format_micros(balance),
    )


def _user(user: UserInfo) -> UserObject:
    return UserObject(
        id=user.id, org_id=user.org_id, email=user.email, name=user.name, created_at=seconds(user.created_at)
    )


def _org_id(db: Database, org: str | None) -> str | None:
    return None if org is None else accounts.get_organization(db, org).id


@router.get("/organizations", response_model=None, responses=documented(OrganizationList, *READ))
def list_organizations(gateway: GatewayDep) -> Response:
    orgs = accounts.list_organizations(gateway.db)
    return json_response(OrganizationList(data=[_org(gateway.db, org) for org in orgs]))


@router.post(
    "/organizations",
    response_model=None,
    responses=documented(OrganizationObject, *WRITE, 404, 409),
)
def create_organization(body: CreateOrganizationRequest, admin: AdminDep, gateway: GatewayDep) -> Response:
    """404: no such tier; 409: the name is taken."""
    org = admin_ops.create_org(gateway.db, actor(admin), body.name, tier=body.tier)
    return json_response(_org(gateway.db, org))


@router.patch(
    "/organizations/{org}", response_model=None, responses=documented(OrganizationObject, *WRITE, 404)
)
def update_organization(
    org: str, body: UpdateOrganizationRequest, admin: AdminDep, gateway: GatewayDep
) -> Response:
    """Moves the organization to another tier; its keys get that tier's limits from their next request."""
    changed = admin_ops.set_org_tier(gateway.db, actor(admin), org, body.tier)
    return json_response(_org(gateway.db, changed))


@router.post(
    "/organizations/{org}/top-ups",
    response_model=None,
    responses=documented(TopUpObject, *WRITE, 404, 409),
)
def top_up(org: str, body: TopUpRequest, admin: AdminDep, gateway: GatewayDep) -> Response:
    """Repeating a top-up with its idempotency key writes nothing and answers `created: false`; the same key
    with another amount or organization is a 409."""
    result = admin_ops.top_up(
        gateway.db,
        actor(admin),
        org,
        body.amount_micros,
        idempotency_key=body.idempotency_key,
        note=body.note,
    )
    entry = result.entry
    balance = ledger.balance_micros(gateway.db, entry.org_id)
    return json_response(
        TopUpObject(
            id=entry.id,
            org_id=entry.org_id,
            amount_micros=entry.amount_micros,
            amount=format_micros(entry.amount_micros),
            idempotency_key=entry.idempotency_key or body.idempotency_key,
            note=entry.note,
            created=result.created,
            created_at=seconds(entry.created_at),
            balance_micros=balance,
            balance=format_micros(balance),
        )
    )


@router.get("/users", response_model=None, responses=documented(UserList, *READ, 404))
def list_users(gateway: GatewayDep, org: OrgQuery = None) -> Response:
    users = accounts.list_users(gateway.db, _org_id(gateway.db, org))
    return json_response(UserList(data=[_user(user) for user in users]))


@router.post("/users", response_model=None, responses=documented(UserObject, *WRITE, 404, 409))
def create_user(body: CreateUserRequest, admin: AdminDep, gateway: GatewayDep) -> Response:
    user = admin_ops.create_user(gateway.db, actor(admin), body.org, body.email, name=body.name)
    return json_response(_user(user))


# -- keys --------------------------------------------------------------------------------------------------


def _key(info: KeyInfo) -> AdminKeyObject:
    return AdminKeyObject(**key_object(info).model_dump(), org_id=info.org_id)


@router.get("/keys", response_model=None, responses=documented(AdminKeyList, *READ, 404))
def list_keys(gateway: GatewayDep, org: OrgQuery = None) -> Response:
    """Every organization's keys, or one's; never their secrets."""
    db = gateway.db
    orgs = accounts.list_organizations(db) if org is None else [accounts.get_organization(db, org)]
    return json_response(AdminKeyList(data=[_key(k) for o in orgs for k in keys.list_keys(db, o.id)]))


@router.post("/keys", response_model=None, responses=documented(CreatedAdminKey, *WRITE, 404))
def create_key(body: CreateAdminKeyRequest, admin: AdminDep, gateway: GatewayDep) -> Response:
    """The secret is in this response only; the database keeps its hash."""
    created = admin_ops.create_key(
        gateway.db,
        actor(admin),
        body.user,
        name=body.name,
        allowed_models=body.allowed_models,
        spend_limit_micros=body.spend_limit_micros,
        expires_at=None if body.expires_at is None else datetime.fromtimestamp(body.expires_at, UTC),
        requests_per_minute=body.requests_per_minute,
        tokens_per_minute=body.tokens_per_minute,
        max_concurrent_requests=body.max_concurrent_requests,
    )
    return json_response(CreatedAdminKey(**_key(created.info).model_dump(), key=created.key))


@router.post("/keys/{key_id}/revoke", response_model=None, responses=documented(AdminKeyObject, *READ, 404))
def revoke_key(key_id: str, admin: AdminDep, gateway: GatewayDep) -> Response:
    """Takes effect on the key's next request. Revoking twice is harmless."""
    return json_response(_key(admin_ops.revoke_key(gateway.db, actor(admin), key_id)))


# -- prices and tiers --------------------------------------------------------------------------------------


def _price(model: str, price: Price) -> PriceObject:
    return PriceObject(model=model, pricing=Pricing.of(price))


@router.get("/prices", response_model=None, responses=documented(PriceList, *READ))
def list_prices(gateway: GatewayDep) -> Response:
    prices = pricing.list_model_prices(gateway.db)
    return json_response(PriceList(data=[_price(model, price) for model, price in prices.items()]))


@router.put("/prices/{model:path}", response_model=None, responses=documented(PriceObject, *WRITE, 404))
def set_price(model: str, body: PriceRequest, admin: AdminDep, gateway: GatewayDep) -> Response:
    """Creates or replaces the price; requests already admitted keep the price they were quoted."""
    price = admin_ops.set_price(
        gateway.db, actor(admin), model, body.input_micros_per_mtok, body.output_micros_per_mtok
    )
    return json_response(_price(model.strip(), price))


def _values(limits: RateLimits) -> RateLimitValues:
    return RateLimitValues(
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        max_concurrent_requests=limits.max_concurrent_requests,
    )


def _tier(info: tiers.TierInfo) -> TierObject:
    return TierObject(
        name=info.limits.name,
        paid_models=_values(info.limits.paid),
        free_models=_values(info.limits.free),
        num_organizations=info.num_organizations,
    )


@router.get("/tiers", response_model=None, responses=documented(TierList, *READ))
def list_tiers(gateway: GatewayDep) -> Response:
    return json_response(TierList(data=[_tier(info) for info in tiers.list_tiers(gateway.db)]))


@router.put("/tiers/{tier}", response_model=None, responses=documented(TierObject, *WRITE, 404, 409))
def set_tier_limits(tier: str, body: TierRequest, admin: AdminDep, gateway: GatewayDep) -> Response:
    """Creates the tier or changes it. Only the limits in the body change (null: unlimited); its
    organizations are held to them from their next request."""
    changes = {field: getattr(body, field) for field in TIER_LIMIT_COLUMNS if field in body.model_fields_set}
    changed = admin_ops.set_tier_limits(gateway.db, actor(admin), tier, changes, copy_from=body.copy_from)
    (info,) = [info for info in tiers.list_tiers(gateway.db) if info.limits.name == changed.name]
    return json_response(_tier(info))


# -- operations --------------------------------------------------------------------------------------------


@router.post(
    "/reservations/release",
    response_model=None,
    responses=documented(ReleasedReservations, *WRITE),
)
def release_reservations(body: ReleaseReservationsRequest, admin: AdminDep, gateway: GatewayDep) -> Response:
    """For a gateway that will not come back: releases (charging nothing) the open reservations it opened,
    and/or those older than `older_than_minutes`. At least one of the two is required."""
    older_than = None if body.older_than_minutes is None else timedelta(minutes=body.older_than_minutes)
    released = admin_ops.release_reservations(
        gateway.db, actor(admin), gateway_id=body.gateway_id, older_than=older_than
    )
    return json_response(ReleasedReservations(released_ids=released))


@router.get("/audit-log", response_model=None, responses=documented(AuditList, *READ))
def list_audit_log(
    gateway: GatewayDep,
    limit: Annotated[int, Query(ge=1, le=audit.MAX_PAGE)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    action: Annotated[str | None, Query(min_length=1, max_length=audit.MAX_ACTION_CHARS)] = None,
    target: Annotated[str | None, Query(min_length=1, max_length=audit.MAX_TARGET_CHARS)] = None,
) -> Response:
    """Newest first. For the next page pass the last `id` as `before_id`."""
    rows = audit.list_audit(gateway.db, limit=limit, before_id=before_id, action=action, target=target)
    has_more = len(rows) == limit and bool(
        audit.list_audit(gateway.db, limit=1, before_id=rows[-1].id, action=action, target=target)
    )
    entries = [
        AuditEntryObject(
            id=row.id,
            created_at=seconds(row.created_at),
            actor=row.actor,
            action=row.action,
            target=row.target,
            before=row.before,
            after=row.after,
        )
        for row in rows
    ]
    return json_response(AuditList(data=entries, has_more=has_more))
