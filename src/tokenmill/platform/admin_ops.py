"""What the operator can do, one function each: `tokenmill admin` and `/v1/admin/...` both call these, so the
two can never disagree on a rule, and each change writes one audit row with its target's state before and
after. A refused call (a `PlatformError`) writes no row, and neither does a call that changes nothing (a
replayed top-up, a second revoke, a price set to what it was): the log is the history of changes. Reads
need no wrapper: callers use `accounts.list_organizations`, `listings.list_listings` and the like."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from tokenmill.platform import accounts, admin_key, audit, invites, keys, ledger, listings, pricing, tiers
from tokenmill.platform.accounts import OrgInfo, UserInfo
from tokenmill.platform.auth import authenticate_admin
from tokenmill.platform.billing import recover_open_reservations
from tokenmill.platform.db import Database
from tokenmill.platform.errors import InvalidArgument, ListingNotFound, ModelNotPriced, UnknownTier
from tokenmill.platform.invites import InviteInfo
from tokenmill.platform.keys import CreatedKey, KeyInfo
from tokenmill.platform.ledger import CreditResult
from tokenmill.platform.listing_terms import ListingChanges, ListingSpec
from tokenmill.platform.listings import ListingInfo
from tokenmill.platform.pricing import Price
from tokenmill.platform.ratelimit import TierLimits
from tokenmill.platform.tables import AdminKey
from tokenmill.platform.tiers import DEFAULT_TIER
from tokenmill.platform.validation import text

MAX_INVITE_DAYS = 365
ANY_GATEWAY = "*"
"""The target of a `release_reservations` not limited to one gateway."""
ADMIN_KEY_TARGET = "admin_key"


# -- organizations, users, keys ----------------------------------------------------------------------


def create_org(db: Database, actor: str, name: str, *, tier: str = DEFAULT_TIER) -> OrgInfo:
    actor = audit.actor_name(actor)
    org = accounts.create_organization(db, name, tier=tier)
    _log(db, actor, "create_org", org.id, None, org)
    return org


def set_org_tier(db: Database, actor: str, org: str, tier: str) -> OrgInfo:
    """`org` is an id or a name, as everywhere below."""
    actor = audit.actor_name(actor)
    before = accounts.get_organization(db, org)
    after = accounts.set_organization_tier(db, before.id, tier)
    _log(db, actor, "set_org_tier", after.id, before, after)
    return after


def create_user(db: Database, actor: str, org: str, email: str, *, name: str = "") -> UserInfo:
    actor = audit.actor_name(actor)
    org_id = accounts.get_organization(db, org).id
    user = accounts.create_user(db, org_id, email, name=name)
    _log(db, actor, "create_user", user.id, None, user)
    return user


def create_key(
    db: Database,
    actor: str,
    user: str,
    *,
    name: str = "",
    allowed_models: Iterable[str] | None = None,
    spend_limit_micros: int | None = None,
    expires_at: datetime | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    max_concurrent_requests: int | None = None,
) -> CreatedKey:
    """`user` is an id or an email. The secret goes back to the caller only: the row holds the key's
    `KeyInfo` (id, visible prefix, grants), which has no secret to leak."""
    actor = audit.actor_name(actor)
    user_id = accounts.get_user(db, user).id
    created = keys.create_key(
        db,
        user_id,
        name=name,
        allowed_models=allowed_models,
        spend_limit_micros=spend_limit_micros,
        expires_at=expires_at,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        max_concurrent_requests=max_concurrent_requests,
    )
    _log(db, actor, "create_key", created.info.id, None, created.info)
    return created


def revoke_key(db: Database, actor: str, key_id: str) -> KeyInfo:
    """Revoking a revoked key changes nothing and writes no row."""
    actor = audit.actor_name(actor)
    before = keys.get_key(db, text("key_id", key_id, max_len=200))
    after = keys.revoke_key(db, before.id)
    _log(db, actor, "revoke_key", after.id, before, after)
    return after


def create_invite(
    db: Database, actor: str, *, note: str = "", max_uses: int = 1, expires_in_days: int | None = None
) -> InviteInfo:
    """A code for `max_uses` sign-ups (while sign-up is by invitation), valid for `expires_in_days` days
    (1 to 365) or until revoked. The row holds the code: whoever reads the log may hand it out anyway."""
    actor = audit.actor_name(actor)
    expires_at = None
    if expires_in_days is not None:
        if type(expires_in_days) is not int or not 1 <= expires_in_days <= MAX_INVITE_DAYS:
            raise InvalidArgument(f"expires_in_days: must be an integer from 1 to {MAX_INVITE_DAYS}")
        expires_at = db.now() + timedelta(days=expires_in_days)
    invite = invites.create_invite(db, actor, note=note, max_uses=max_uses, expires_at=expires_at)
    _log(db, actor, "create_invite", invite.id, None, invite)
    return invite


def revoke_invite(db: Database, actor: str, invite_id: str) -> InviteInfo:
    """Revoking a revoked invite changes nothing and writes no row."""
    actor = audit.actor_name(actor)
    before = invites.get_invite(db, invite_id)
    after = invites.revoke_invite(db, before.id)
    _log(db, actor, "revoke_invite", after.id, before, after)
    return after


# -- money and limits --------------------------------------------------------------------------------


def top_up(
    db: Database, actor: str, org: str, amount_micros: int, *, idempotency_key: str, note: str = ""
) -> CreditResult:
    """A replay with the same idempotency key writes nothing, no audit row either. The balances in the row
    are as read just before and just after: requests settling meanwhile move them too."""
    actor = audit.actor_name(actor)
    org_id = accounts.get_organization(db, org).id
    before = ledger.balance_micros(db, org_id)
    result = ledger.top_up(db, org_id, amount_micros, idempotency_key=idempotency_key, note=note)
    if result.created:
        after = {"balance_micros": ledger.balance_micros(db, org_id), "entry": result.entry}
        _log(db, actor, "top_up", org_id, {"balance_micros": before}, after)
    return result


def set_price(
    db: Database, actor: str, model: str, input_micros_per_mtok: int, output_micros_per_mtok: int
) -> Price:
    actor = audit.actor_name(actor)
    model = text("model", model, max_len=200)
    try:
        before: Price | None = pricing.get_model_price(db, model)
    except ModelNotPriced:
        before = None
    after = pricing.set_model_price(db, model, input_micros_per_mtok, output_micros_per_mtok)
    _log(db, actor, "set_price", model, before, after)
    return after


def set_tier_limits(
    db: Database,
    actor: str,
    tier: str,
    changes: Mapping[str, int | None],
    *,
    copy_from: str | None = None,
) -> TierLimits:
    """Creates the tier if it does not exist (see `tiers.set_tier_limits` for where the other limits come
    from)."""
    actor = audit.actor_name(actor)
    try:
        before: TierLimits | None = tiers.get_tier(db, tier)
    except UnknownTier:
        before = None
    after = tiers.set_tier_limits(db, tier, changes, copy_from=copy_from)
    _log(db, actor, "set_tier_limits", after.name, before, after)
    return after


# -- the model square --------------------------------------------------------------------------------


def apply_listing(db: Database, actor: str, spec: ListingSpec) -> ListingInfo:
    """Create or replace the listing of `spec.model` with exactly `spec`."""
    actor = audit.actor_name(actor)
    before = _listing_or_none(db, spec.model)
    after = listings.apply_listing(db, spec)
    _log(db, actor, "apply_listing", after.model, before, after)
    return after


def update_listing(db: Database, actor: str, model: str, changes: ListingChanges) -> ListingInfo:
    actor = audit.actor_name(actor)
    before = listings.get_listing(db, model)
    after = listings.update_listing(db, before.model, changes)
    _log(db, actor, "update_listing", after.model, before, after)
    return after


def set_listing_status(db: Database, actor: str, model: str, status: str) -> ListingInfo:
    """draft | published | retired."""
    actor = audit.actor_name(actor)
    before = listings.get_listing(db, model)
    after = listings.set_listing_status(db, before.model, status)
    _log(db, actor, "set_listing_status", after.model, before, after)
    return after


# -- recovery and the operator's own key ---------------------------------------------------------------


def release_reservations(
    db: Database, actor: str, *, gateway_id: str | None = None, older_than: timedelta | None = None
) -> list[str]:
    """For a gateway that will not come back (a restarting gateway releases its own by itself): release the
    open reservations it opened, and/or those opened more than `older_than` ago; nothing is charged for
    them. Returns their ids; the row lists them (none released: no row)."""
    actor = audit.actor_name(actor)
    if gateway_id is None and older_than is None:
        raise InvalidArgument("gateway_id: give a gateway id, a minimum age (older_than), or both")
    if gateway_id is not None:
        gateway_id = text("gateway_id", gateway_id, max_len=200)
    opened_before = None if older_than is None else _moment_before(db, older_than)
    released = recover_open_reservations(db, owner=gateway_id, opened_before=opened_before)
    if released:
        chosen = {"gateway_id": gateway_id, "opened_before": opened_before, "reservation_ids": released}
        target = ANY_GATEWAY if gateway_id is None else gateway_id
        _log(
            db,
            actor,
            "release_reservations",
            target,
            chosen | {"state": "open"},
            chosen | {"state": "released"},
        )
    return released


def rotate_admin_key(db: Database, actor: str, data_dir: str | Path) -> str:
    """Revoke every admin key and return a new one (also written to `<data_dir>/admin_key`). The row holds
    key ids only: the ones revoked before, the new one after."""
    actor = audit.actor_name(actor)
    before = _active_admin_key_ids(db)
    raw = admin_key.rotate_admin_key(db, data_dir)
    after = [authenticate_admin(db, raw).key_id]
    _log(
        db, actor, "rotate_admin_key", ADMIN_KEY_TARGET, {"active_key_ids": before}, {"active_key_ids": after}
    )
    return raw


# -- helpers -------------------------------------------------------------------------------------------


def _log(db: Database, actor: str, action: str, target: str, before: object, after: object) -> None:
    if audit.snapshot(before) != audit.snapshot(after):
        audit.record(db, actor, action, target, before, after)


def _listing_or_none(db: Database, model: str) -> ListingInfo | None:
    try:
        return listings.get_listing(db, text("model", model, max_len=200))
    except ListingNotFound:
        return None


def _moment_before(db: Database, older_than: timedelta) -> datetime:
    if not isinstance(older_than, timedelta) or older_than <= timedelta(0):
        raise InvalidArgument("older_than: must be a positive duration")
    try:
        return db.now() - older_than
    except OverflowError:
        raise InvalidArgument("older_than: reaches before the year 1") from None


def _active_admin_key_ids(db: Database) -> list[str]:
    with db.read() as session:
        return sorted(session.scalars(select(AdminKey.id).where(AdminKey.revoked_at.is_(None))))
