"""Per-request billing as a state machine on a reservation row: `reserve` (open) -> `settle` (charge the
actual usage, credit the provider its share, write one usage record) | `release` (charge nothing). Every
transition locks the buying organization first, so concurrent requests can never spend the same micro
twice; the provider is credited by an insert and never locked (see `ledger.append_earning`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tokenmill.platform.auth import authorize_model
from tokenmill.platform.db import Database
from tokenmill.platform.errors import InsufficientQuota, InvalidArgument, NotFound, ReservationClosed
from tokenmill.platform.ledger import append_charge, append_earning, lock_organization, sum_balance
from tokenmill.platform.listings import ListingInfo
from tokenmill.platform.pricing import BPS_PER_UNIT, Price, cost_micros, revenue_split
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.platform.tables import ApiKey, UsageRecord, new_id
from tokenmill.platform.tables import Reservation as ReservationRow

logger = logging.getLogger(__name__)

DEFAULT_OWNER = "local"


class UsageStatus(StrEnum):
    OK = "ok"
    CLIENT_DISCONNECTED = "client_disconnected"
    """The client went away mid-stream: charge what was generated."""
    ERROR = "error"
    """The engine failed: charge nothing."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """Handle of an open reservation, returned by `reserve` and passed back to `settle`/`release`.
    The database row is the truth; this carries what the caller may want to log or show."""

    id: str
    org_id: str
    key_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    price: Price
    reserved_micros: int
    provider_org_id: str | None
    """The listing's provider as of admission; None: the platform's own model."""
    platform_fee_bps: int
    """The platform's share of the sale, quoted at admission like the price."""


@dataclass(frozen=True, slots=True)
class UsageInfo:
    reservation_id: str
    org_id: str
    key_id: str
    user_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    """What the buyer was charged: provider_micros + platform_fee_micros, exactly."""
    provider_micros: int
    """Credited to the provider (0 for the platform's own model)."""
    platform_fee_micros: int
    provider_org_id: str | None
    latency_ms: int
    status: str
    created_at: datetime


def held_micros(session: Session, org_id: str) -> int:
    """Money held by open reservations: not spent yet, but not available either."""
    total = session.scalar(
        select(func.coalesce(func.sum(ReservationRow.reserved_micros), 0)).where(
            ReservationRow.org_id == org_id, ReservationRow.state == "open"
        )
    )
    return int(total or 0)


def key_committed_micros(session: Session, key_id: str) -> int:
    """What a key has spent plus what it holds open: the figure its spend limit caps."""
    spent = session.scalar(
        select(func.coalesce(func.sum(UsageRecord.cost_micros), 0)).where(UsageRecord.key_id == key_id)
    )
    held = session.scalar(
        select(func.coalesce(func.sum(ReservationRow.reserved_micros), 0)).where(
            ReservationRow.key_id == key_id, ReservationRow.state == "open"
        )
    )
    return int(spent or 0) + int(held or 0)


def reserve(
    db: Database,
    principal: KeyPrincipal,
    listing: ListingInfo,
    prompt_tokens: int,
    max_tokens: int,
    *,
    owner: str = DEFAULT_OWNER,
    fee_bps: int,
) -> Reservation:
    """Admission: hold the worst-case cost (prompt_tokens + max_tokens at the listing's price, as resolved
    for this request) or raise `InsufficientQuota` having written nothing. The price, the provider and
    `fee_bps` (the platform's share, `listing.fee_bps(server default)`) are quoted on the reservation: settle
    bills and splits by them whatever changes meanwhile. Also raises `ModelNotAllowed`."""
    _check_tokens(prompt_tokens=prompt_tokens, max_tokens=max_tokens)
    if type(fee_bps) is not int or not 0 <= fee_bps <= BPS_PER_UNIT:
        raise InvalidArgument(f"fee_bps: must be an integer from 0 to {BPS_PER_UNIT}")
    model, price = listing.model, listing.price
    authorize_model(principal, model)
    cost = cost_micros(prompt_tokens, max_tokens, price)
    with db.write() as session:
        lock_organization(session, principal.org_id)
        if cost > 0:
            available = sum_balance(session, principal.org_id) - held_micros(session, principal.org_id)
            if available < cost:
                raise InsufficientQuota("balance", cost, max(available, 0))
            if principal.spend_limit_micros is not None:
                left = principal.spend_limit_micros - key_committed_micros(session, principal.key_id)
                if left < cost:
                    raise InsufficientQuota("key_spend_limit", cost, max(left, 0))
        row = ReservationRow(
            id=new_id("res"),
            org_id=principal.org_id,
            key_id=principal.key_id,
            model=model,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            input_micros_per_mtok=price.input_micros_per_mtok,
            output_micros_per_mtok=price.output_micros_per_mtok,
            reserved_micros=cost,
            state="open",
            owner=owner,
            provider_org_id=listing.provider_org_id,
            platform_fee_bps=fee_bps,
            created_at=db.now(),
            closed_at=None,
        )
        session.add(row)
    return Reservation(
        id=row.id,
        org_id=row.org_id,
        key_id=row.key_id,
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        price=price,
        reserved_micros=cost,
        provider_org_id=listing.provider_org_id,
        platform_fee_bps=fee_bps,
    )


def settle(
    db: Database,
    reservation: Reservation,
    prompt_tokens: int,
    completion_tokens: int,
    status: UsageStatus | str,
    latency_s: float,
    *,
    also: Callable[[Session], None] | None = None,
) -> UsageInfo:
    """Close the reservation, charge the actual usage at the quoted price (nothing for `error`), credit the
    provider its share at the quoted fee and write the one usage record, all in one transaction. Token
    counts are the engine's, never estimates. `also` writes the caller's own record of the result in that
    same transaction (a batch line's answer), so the two commit together or not at all."""
    try:
        status = UsageStatus(status)
    except ValueError:
        raise InvalidArgument(f"status: must be one of {[s.value for s in UsageStatus]}") from None
    _check_tokens(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    if not latency_s >= 0:
        raise InvalidArgument("latency_s: must be >= 0")
    now = db.now()
    with db.write() as session:
        row = _open_row(session, reservation)
        price = Price(row.input_micros_per_mtok, row.output_micros_per_mtok)
        cost = 0 if status is UsageStatus.ERROR else cost_micros(prompt_tokens, completion_tokens, price)
        if cost > row.reserved_micros:
            # The caller passed more tokens than it reserved for; bill the truth, but say so loudly.
            logger.warning(
                "reservation %s: actual cost %d exceeds the %d micros reserved",
                row.id,
                cost,
                row.reserved_micros,
            )
        provider_micros, fee_micros = _split(cost, row)
        if cost > 0:
            append_charge(session, row.org_id, cost, row.id, now)
        if provider_micros > 0 and row.provider_org_id is not None:
            append_earning(session, row.provider_org_id, provider_micros, row.id, now)
        user_id = session.scalar(select(ApiKey.user_id).where(ApiKey.id == row.key_id))
        assert user_id is not None  # the foreign key guarantees it
        record = UsageRecord(
            reservation_id=row.id,
            org_id=row.org_id,
            key_id=row.key_id,
            user_id=user_id,
            model=row.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_micros=cost,
            latency_ms=round(latency_s * 1000),
            status=status.value,
            provider_org_id=row.provider_org_id,
            provider_micros=provider_micros,
            platform_fee_micros=fee_micros,
            day=now.date(),
            created_at=now,
        )
        session.add(record)
        row.state, row.closed_at = "settled", now
        if also is not None:
            also(session)
    return UsageInfo(
        reservation_id=row.id,
        org_id=row.org_id,
        key_id=row.key_id,
        user_id=user_id,
        model=row.model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost_micros=cost,
        provider_micros=provider_micros,
        platform_fee_micros=fee_micros,
        provider_org_id=row.provider_org_id,
        latency_ms=record.latency_ms,
        status=status.value,
        created_at=now,
    )


def release(db: Database, reservation: Reservation) -> None:
    """Close the reservation without a charge or usage record: the request never reached the engine."""
    with db.write() as session:
        row = _open_row(session, reservation)
        row.state, row.closed_at = "released", db.now()


def recover_open_reservations(
    db: Database, *, owner: str | None = None, opened_before: datetime | None = None
) -> list[str]:
    """Startup recovery: release reservations a crash left open, and return their ids.

    Choice: release (no charge, no usage record), because no tokens can be proven delivered after a crash;
    the interrupted request is the platform's loss, never the customer's, and nothing is charged twice.
    With several gateways sharing one database, pass `owner` (this gateway's stable instance name) or
    `opened_before` (older than any live request) so a restarting gateway does not release the open
    reservations of its live peers. Safe to run while other requests settle: each row closes once."""
    conditions = [ReservationRow.state == "open"]
    if owner is not None:
        conditions.append(ReservationRow.owner == owner)
    if opened_before is not None:
        conditions.append(ReservationRow.created_at < opened_before)
    with db.write() as session:
        # One UPDATE: a row a concurrent settle closes first no longer matches state = 'open'.
        ids = list(
            session.scalars(
                update(ReservationRow)
                .where(*conditions)
                .values(state="released", closed_at=db.now())
                .returning(ReservationRow.id)
                .execution_options(synchronize_session=False)
            )
        )
    if ids:
        logger.warning("released %d reservation(s) left open by an earlier crash", len(ids))
    return ids


def _split(cost: int, row: ReservationRow) -> tuple[int, int]:
    """(provider_micros, platform_fee_micros) of the sale. The platform keeps the whole sale of its own model
    (no provider, including reservations opened before listings existed) and of a provider's call to its own
    model (an organization using its fine-tune pays for the serving like anyone, and earns nothing from
    itself)."""
    if row.provider_org_id is None or row.provider_org_id == row.org_id:
        return 0, cost
    return revenue_split(cost, row.platform_fee_bps)


def _open_row(session: Session, reservation: Reservation) -> ReservationRow:
    lock_organization(session, reservation.org_id)
    row = session.get(ReservationRow, reservation.id, with_for_update=True)
    if row is None or row.org_id != reservation.org_id:
        raise NotFound(f"reservation: no reservation {reservation.id!r}")
    if row.state != "open":
        raise ReservationClosed(f"reservation {row.id} is already {row.state}")
    return row


def _check_tokens(**counts: int) -> None:
    for field, value in counts.items():
        if type(value) is not int or value < 0:
            raise InvalidArgument(f"{field}: must be a non-negative integer")
