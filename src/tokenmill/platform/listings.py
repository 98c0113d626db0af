"""The model square's rows: who provides each model, who may call it, on what terms. A listing's price is
the `model_prices` row of the same model (billing's one source of prices); every write here changes a
listing and its price in one transaction.

Who may call a listing (`ListingInfo.callable_by`): nobody once it is retired; its provider while it is a
draft or published; any other organization only while it is published and public, or shared with it. A
caller that may not call a model cannot tell it from one that does not exist (`ModelNotFound`); only the
provider learns that its model was retired (`ListingRetired`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tokenmill.platform.db import Database
from tokenmill.platform.errors import (
    Conflict,
    InvalidArgument,
    ListingNotFound,
    ListingRetired,
    ModelNotFound,
    UnknownOrganization,
)
from tokenmill.platform.listing_terms import (
    MAX_MODEL_CHARS,
    ListingChanges,
    ListingSpec,
    check_sharing,
    checked_changes,
    checked_spec,
    choice,
    model_ref,
)
from tokenmill.platform.pricing import BPS_PER_UNIT, FREE, Price, put_price
from tokenmill.platform.tables import (
    LISTING_STATUSES,
    LISTING_TASKS,
    Listing,
    ModelPrice,
    Organization,
    new_id,
)
from tokenmill.platform.tiers import DEFAULT_TIER, require_tier
from tokenmill.platform.validation import text

PLATFORM_PROVIDER = "tokenmill"
"""The provider shown for the platform's own models (`provider_org_id` None)."""
DEFAULT_PLATFORM_FEE_BPS = 2000
"""The platform's share of a provider's sale when neither the server nor the listing sets one: 20%."""
_ORG_ID_RE = re.compile(r"^org_[0-9a-f]{16}$")
_WRITE_ATTEMPTS = 5
_PROVIDER_STATUSES = ("published", "retired")
"""What a provider may ask its listing to become; drafts come from the operator or models.yaml."""
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ListingInfo:
    model: str
    provider_org_id: str | None
    """None: the platform's own model."""
    provider: str
    """The provider organization's name, or `PLATFORM_PROVIDER`."""
    display_name: str
    description: str
    task: str
    tags: tuple[str, ...]
    license: str
    context_length: int | None
    status: str
    visibility: str
    shared_with: tuple[str, ...]
    """Organization ids that may call a `shared` listing besides its provider."""
    price: Price
    """The `model_prices` row of the same model, read with the listing."""
    platform_fee_bps: int | None
    """The listing's own fee; None: the server's default (see `fee_bps`)."""
    created_at: datetime
    updated_at: datetime

    def fee_bps(self, default_bps: int) -> int:
        """The platform's share of each sale in basis points: all of it for the platform's own model, else
        the listing's own fee or the server's `default_bps`."""
        if self.provider_org_id is None:
            return BPS_PER_UNIT
        return default_bps if self.platform_fee_bps is None else self.platform_fee_bps

    def callable_by(self, org_id: str) -> bool:
        """Whether keys of `org_id` may call this model now (the module docstring's rule)."""
        own = self.provider_org_id is not None and self.provider_org_id == org_id
        if self.status == "draft":
            return own
        if self.status != "published":
            return False
        return (
            self.visibility == "public" or own or (self.visibility == "shared" and org_id in self.shared_with)
        )


def apply_listing(
    db: Database, spec: ListingSpec, *, digest: str | None = None, create_provider: bool = False
) -> ListingInfo:
    """Create the listing or replace every field `spec` declares, with its price, in one transaction.

    `digest` (of the models.yaml entry, at serve start): when the stored one equals it nothing is changed, so
    a provider's edits through the API survive restarts with an unchanged file; otherwise the spec is
    applied and the digest stored. Without a digest the spec is applied and the stored digest kept.
    `create_provider`: a provider organization that does not exist is created on the default tier; without
    it that is an `UnknownOrganization` naming `provider`. A retired listing stays retired: only
    `set_listing_status` brings it back."""
    spec = checked_spec(spec)
    if digest is not None:
        digest = text("digest", digest, max_len=64)

    def work(session: Session, now: datetime) -> ListingInfo:
        row = session.get(Listing, spec.model, with_for_update=True)
        if row is not None and digest is not None and row.config_digest == digest:
            _ensure_price(session, spec.model, None, now)
            return _read(session, spec.model)
        provider_org_id = None
        if spec.provider is not None:
            provider_org_id = _provider_id(session, spec.provider, create=create_provider, now=now)
        shared_with = _org_ids(session, "shared_with", spec.shared_with)
        if row is None:
            row = Listing(model=spec.model, status=spec.status, config_digest=None, created_at=now)
            session.add(row)
        elif row.status != "retired":
            row.status = spec.status
        row.provider_org_id = provider_org_id
        row.display_name = spec.display_name or spec.model
        row.description, row.task, row.tags = spec.description, spec.task, list(spec.tags)
        row.license, row.context_length = spec.license, spec.context_length
        row.visibility, row.shared_with = spec.visibility, shared_with
        row.platform_fee_bps = spec.platform_fee_bps
        if digest is not None:
            row.config_digest = digest
        row.updated_at = now
        _ensure_price(session, spec.model, spec.price, now)
        return _read(session, spec.model)

    return _write(db, work)


def ensure_listing(db: Database, model: str, *, task: str = "chat") -> bool:
    """The `--model` quick path: list `model` as the platform's own, public and published (free when it has
    no price yet), unless it is listed already, in whatever status. Returns whether it was created. Safe
    when several gateways start at once."""
    model = text("model", model, max_len=MAX_MODEL_CHARS)
    task = choice("task", task, LISTING_TASKS)

    def work(session: Session, now: datetime) -> bool:
        if session.get(Listing, model) is not None:
            return False
        _ensure_price(session, model, None, now)
        session.add(
            Listing(
                model=model,
                provider_org_id=None,
                display_name=model,
                description="",
                task=task,
                tags=[],
                license="",
                context_length=None,
                status="published",
                visibility="public",
                shared_with=[],
                platform_fee_bps=None,
                config_digest=None,
                created_at=now,
                updated_at=now,
            )
        )
        session.flush()
        return True

    return _write(db, work)


def get_listing(db: Database, model: str) -> ListingInfo:
    """The operator's view, any status; `ListingNotFound` when there is none."""
    model = model_ref(model)
    with db.read() as session:
        found = session.execute(_query().where(Listing.model == model)).first()
    if found is None:
        raise ListingNotFound(model)
    return _info(*found)


def list_listings(db: Database) -> list[ListingInfo]:
    """Every listing in any status, by model id (the operator's view)."""
    with db.read() as session:
        listings = [_info(*found) for found in session.execute(_query()).all()]
    return _by_model(listings)


def callable_listings(db: Database, org_id: str) -> list[ListingInfo]:
    """What keys of `org_id` may call, by model id: exactly the models `resolve_listing` lets it call."""
    with db.read() as session:
        listings = [_info(*found) for found in session.execute(_query().where(Listing.status != "retired"))]
    return _by_model([listing for listing in listings if listing.callable_by(org_id)])


def resolve_listing(db: Database, org_id: str, model: str) -> ListingInfo:
    """Per request: the listing `org_id` asks for, if it may call it. Raises `ModelNotFound` (one message for
    every reason) or, to the provider only, `ListingRetired`."""
    model = model_ref(model)
    with db.read() as session:
        found = session.execute(_query().where(Listing.model == model)).first()
    if found is None:
        raise ModelNotFound(model)
    listing = _info(*found)
    if listing.callable_by(org_id):
        return listing
    if listing.status == "retired" and listing.provider_org_id == org_id:
        raise ListingRetired(model)
    raise ModelNotFound(model)


def provider_of(db: Database, model: str) -> str | None:
    """The organization that provides `model` (None for the platform's own models and unknown ones)."""
    with db.read() as session:
        return session.scalar(select(Listing.provider_org_id).where(Listing.model == model_ref(model)))


def own_listings(db: Database, org_id: str) -> list[ListingInfo]:
    """Every listing `org_id` provides, in any status, by model id: what its provider manages."""
    with db.read() as session:
        found = session.execute(_query().where(Listing.provider_org_id == org_id)).all()
    return _by_model([_info(*row) for row in found])


def update_own_listing(db: Database, org_id: str, model: str, changes: ListingChanges) -> ListingInfo:
    """A provider key's edit of its organization's listing. Any other listing, the platform's own included,
    is a `ModelNotFound`, as if it did not exist, and nothing is changed; a retired one is `ListingRetired`
    (only the operator brings it back). `shared_with` takes organization ids only here: names can be
    guessed, so accepting them would let any provider key probe which organizations exist.

    `status`: a provider publishes its draft or retires its published listing (as the operator's retire:
    new requests are refused, those admitted finish); any other move is refused naming `status`."""
    model = model_ref(model)
    changes = checked_changes(changes)
    if changes.status is not None and changes.status not in _PROVIDER_STATUSES:
        raise InvalidArgument(f"status: a provider may set {' or '.join(_PROVIDER_STATUSES)} only")

    def work(session: Session, now: datetime) -> ListingInfo:
        row = session.get(Listing, model, with_for_update=True)
        if row is None or row.provider_org_id is None or row.provider_org_id != org_id:
            raise ModelNotFound(model)
        if row.status == "retired":
            if changes.status is not None:
                raise Conflict("status: the listing is retired; only the server's operator can bring it back")
            raise ListingRetired(model)
        if changes.status == "retired" and row.status != "published":
            raise Conflict(f"status: only a published listing can be retired (this one is {row.status})")
        _change(session, row, changes, now, ids_only=True)
        return _read(session, model)

    return _write(db, work)


def update_listing(db: Database, model: str, changes: ListingChanges) -> ListingInfo:
    """The operator's edit of any listing; `ListingNotFound` when there is none."""
    model = model_ref(model)
    changes = checked_changes(changes)

    def work(session: Session, now: datetime) -> ListingInfo:
        row = session.get(Listing, model, with_for_update=True)
        if row is None:
            raise ListingNotFound(model)
        _change(session, row, changes, now)
        return _read(session, model)

    return _write(db, work)


def set_listing_status(db: Database, model: str, status: str) -> ListingInfo:
    """The operator's draft | published | retired. Retiring stops new requests only: those already admitted
    finish and are billed at the terms they were quoted."""
    model = model_ref(model)
    status = choice("status", status, LISTING_STATUSES)

    def work(session: Session, now: datetime) -> ListingInfo:
        row = session.get(Listing, model, with_for_update=True)
        if row is None:
            raise ListingNotFound(model)
        row.status, row.updated_at = status, now
        return _read(session, model)

    return _write(db, work)


# --- reading ----------------------------------------------------------------------------------------


def _query() -> Select[tuple[Listing, ModelPrice, str | None]]:
    # An inner join on the price: a listing without one (which no function here writes) is never served,
    # rather than served for free by accident.
    return (
        select(Listing, ModelPrice, Organization.name)
        .join(ModelPrice, ModelPrice.model == Listing.model)
        .outerjoin(Organization, Organization.id == Listing.provider_org_id)
    )


def _info(row: Listing, price: ModelPrice, provider_name: str | None) -> ListingInfo:
    return ListingInfo(
        model=row.model,
        provider_org_id=row.provider_org_id,
        provider=PLATFORM_PROVIDER if row.provider_org_id is None else provider_name or row.provider_org_id,
        display_name=row.display_name,
        description=row.description,
        task=row.task,
        tags=tuple(row.tags),
        license=row.license,
        context_length=row.context_length,
        status=row.status,
        visibility=row.visibility,
        shared_with=tuple(row.shared_with),
        price=Price(price.input_micros_per_mtok, price.output_micros_per_mtok),
        platform_fee_bps=row.platform_fee_bps,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _by_model(listings: list[ListingInfo]) -> list[ListingInfo]:
    # Sorted here, not in SQL: PostgreSQL orders text by its collation, SQLite by code point.
    return sorted(listings, key=lambda listing: listing.model)


def _read(session: Session, model: str) -> ListingInfo:
    found = session.execute(_query().where(Listing.model == model)).one()
    return _info(*found)


# --- writing ----------------------------------------------------------------------------------------


def _write(db: Database, work: Callable[[Session, datetime], _T]) -> _T:
    """Run `work` in one write transaction, again when it loses an insert race (two gateways starting
    with the same models, a provider created twice): the next attempt finds the other's row."""
    for _ in range(_WRITE_ATTEMPTS):
        try:
            with db.write() as session:
                return work(session, db.now())
        except IntegrityError:
            continue
    raise Conflict("model: the listing kept changing concurrently; try again")


def _change(
    session: Session, row: Listing, changes: ListingChanges, now: datetime, *, ids_only: bool = False
) -> None:
    visibility = changes.visibility or row.visibility
    if changes.shared_with is not None:
        shared_with = _org_ids(session, "shared_with", changes.shared_with, ids_only=ids_only)
    else:
        shared_with = list(row.shared_with) if visibility == "shared" else []
    check_sharing(visibility, shared_with)
    if changes.description is not None:
        row.description = changes.description
    if changes.display_name is not None:
        row.display_name = changes.display_name
    if changes.tags is not None:
        row.tags = list(changes.tags)
    if changes.status is not None:
        row.status = changes.status
    if changes.price is not None:
        put_price(session, row.model, changes.price, now)
    row.visibility, row.shared_with = visibility, shared_with
    row.updated_at = now


def _ensure_price(session: Session, model: str, price: Price | None, now: datetime) -> None:
    """Set `price`; None keeps the current one, or makes a model with none free."""
    if price is not None:
        put_price(session, model, price, now)
    elif session.get(ModelPrice, model) is None:
        put_price(session, model, FREE, now)


def _find_org(session: Session, ref: str) -> Organization | None:
    """By id first, then by name (the operator and models.yaml may use either)."""
    org = session.get(Organization, ref)
    if org is None:
        org = session.scalar(select(Organization).where(Organization.name == ref))
    return org


def _provider_id(session: Session, ref: str, *, create: bool, now: datetime) -> str:
    org = _find_org(session, ref)
    if org is not None:
        return org.id
    # A missing org_… id is a typo, never the name of an organization to create.
    if not create or _ORG_ID_RE.match(ref):
        raise UnknownOrganization(f"provider: no organization {ref!r}")
    require_tier(session, DEFAULT_TIER)
    org = Organization(id=new_id("org"), name=ref, tier=DEFAULT_TIER, created_at=now)
    session.add(org)
    session.flush()  # a concurrent creation of the same name fails here, and `_write` tries again
    return org.id


def _org_ids(session: Session, field: str, refs: Iterable[str], *, ids_only: bool = False) -> list[str]:
    ids: list[str] = []
    for index, ref in enumerate(refs):
        org = session.get(Organization, ref) if ids_only else _find_org(session, ref)
        if org is None and ids_only:
            raise InvalidArgument(f"{field}[{index}]: {ref!r} is not the id of an organization (org_...)")
        if org is None:
            raise UnknownOrganization(f"{field}: no organization {ref!r}")
        if org.id not in ids:
            ids.append(org.id)
    return ids
