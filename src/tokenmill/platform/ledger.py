"""The append-only balance ledger of each organization: top-ups, charges, refunds, adjustments, and the
earnings a provider is credited for each sale of its models. Balance = SUM(amount_micros). Credits are
idempotent by a client-supplied key; charges and earnings by their reservation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tokenmill.platform.db import Database
from tokenmill.platform.errors import IdempotencyConflict, InvalidAmount, InvalidArgument, UnknownOrganization
from tokenmill.platform.tables import LedgerEntry, Organization
from tokenmill.platform.validation import text

MAX_ENTRY_MICROS = 10**15
"""One billion currency units per entry: a typo guard that also keeps sums far from int64 overflow."""


@dataclass(frozen=True, slots=True)
class LedgerEntryInfo:
    id: int
    org_id: str
    kind: str
    amount_micros: int
    idempotency_key: str | None
    reservation_id: str | None
    note: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CreditResult:
    entry: LedgerEntryInfo
    created: bool
    """False when the idempotency key had already been used for this same credit: nothing was written."""


def _entry_info(row: LedgerEntry) -> LedgerEntryInfo:
    return LedgerEntryInfo(
        id=row.id,
        org_id=row.org_id,
        kind=row.kind,
        amount_micros=row.amount_micros,
        idempotency_key=row.idempotency_key,
        reservation_id=row.reservation_id,
        note=row.note,
        created_at=row.created_at,
    )


def lock_organization(session: Session, org_id: str) -> Organization:
    """Serialize every money decision of one organization. PostgreSQL: FOR NO KEY UPDATE on its row (does
    not block inserts that merely reference it). SQLite: a no-op, the write transaction already holds the
    database write lock. Must be the first statement of the transaction so later reads see fresh data."""
    org = session.scalar(
        select(Organization).where(Organization.id == org_id).with_for_update(key_share=True)
    )
    if org is None:
        raise UnknownOrganization(f"org_id: no organization {org_id!r}")
    return org


def sum_balance(session: Session, org_id: str) -> int:
    total = session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0)).where(LedgerEntry.org_id == org_id)
    )
    return int(total or 0)  # PostgreSQL sums BIGINT as NUMERIC


def balance_micros(db: Database, org_id: str) -> int:
    with db.read() as session:
        if session.get(Organization, org_id) is None:
            raise UnknownOrganization(f"org_id: no organization {org_id!r}")
        return sum_balance(session, org_id)


def list_entries(db: Database, org_id: str, limit: int = 1000) -> list[LedgerEntryInfo]:
    with db.read() as session:
        rows = session.scalars(
            select(LedgerEntry)
            .where(LedgerEntry.org_id == org_id)
            .order_by(LedgerEntry.id.desc())
            .limit(limit)
        )
        return [_entry_info(r) for r in rows]


def top_up(
    db: Database, org_id: str, amount_micros: int, *, idempotency_key: str, note: str = ""
) -> CreditResult:
    """Add money. Retrying with the same idempotency key returns the first entry and writes nothing."""
    _check_amount(amount_micros, allow_negative=False)
    return _credit(db, org_id, "topup", amount_micros, idempotency_key, note)


def refund(db: Database, org_id: str, amount_micros: int, *, idempotency_key: str, note: str) -> CreditResult:
    _check_amount(amount_micros, allow_negative=False)
    return _credit(db, org_id, "refund", amount_micros, idempotency_key, note)


def adjust(db: Database, org_id: str, amount_micros: int, *, idempotency_key: str, note: str) -> CreditResult:
    """A signed correction by an operator. A negative one can take the balance below zero, on purpose."""
    _check_amount(amount_micros, allow_negative=True)
    if not note.strip():
        raise InvalidArgument("note: an adjustment must say why")
    return _credit(db, org_id, "adjustment", amount_micros, idempotency_key, note)


def append_charge(
    session: Session, org_id: str, amount_micros: int, reservation_id: str, now: datetime
) -> None:
    """Billing's write: a negative entry tied to its reservation (unique, so never charged twice)."""
    session.add(
        LedgerEntry(
            org_id=org_id,
            kind="charge",
            amount_micros=-amount_micros,
            idempotency_key=None,
            reservation_id=reservation_id,
            note="",
            created_at=now,
        )
    )


def append_earning(
    session: Session, provider_org_id: str, amount_micros: int, reservation_id: str, now: datetime
) -> None:
    """Billing's other write at settle: the provider's share of one sale, credited in the buyer's charge's
    transaction. Keyed `earning:<reservation id>` (unique), so one sale is never credited twice. The provider
    is not locked: this is an insert, and its foreign key takes only a key-share lock on the organization,
    which never waits for `lock_organization` (two organizations buying each other's models cannot
    deadlock)."""
    session.add(
        LedgerEntry(
            org_id=provider_org_id,
            kind="earning",
            amount_micros=amount_micros,
            idempotency_key=f"earning:{reservation_id}",
            reservation_id=None,
            note="",
            created_at=now,
        )
    )


def _check_amount(amount_micros: object, *, allow_negative: bool) -> None:
    if type(amount_micros) is not int:
        raise InvalidAmount(
            f"amount_micros: must be an integer number of micros, got "
            f"{type(amount_micros).__name__} {amount_micros!r}"
        )
    if amount_micros == 0 or (amount_micros < 0 and not allow_negative):
        raise InvalidAmount(
            f"amount_micros: must be {'non-zero' if allow_negative else 'positive'}, got {amount_micros}"
        )
    if abs(amount_micros) > MAX_ENTRY_MICROS:
        raise InvalidAmount(f"amount_micros: at most {MAX_ENTRY_MICROS} per entry")


def _credit(
    db: Database, org_id: str, kind: str, amount_micros: int, idempotency_key: str, note: str
) -> CreditResult:
    idempotency_key = text("idempotency_key", idempotency_key, max_len=200)
    note = text("note", note, max_len=500, allow_empty=True)
    try:
        with db.write() as session:
            lock_organization(session, org_id)
            existing = session.scalar(
                select(LedgerEntry).where(LedgerEntry.idempotency_key == idempotency_key)
            )
            if existing is not None:
                return CreditResult(_same_credit(existing, org_id, kind, amount_micros), created=False)
            row = LedgerEntry(
                org_id=org_id,
                kind=kind,
                amount_micros=amount_micros,
                idempotency_key=idempotency_key,
                reservation_id=None,
                note=note,
                created_at=db.now(),
            )
            session.add(row)
            session.flush()
            return CreditResult(_entry_info(row), created=True)
    except IntegrityError:
        # Another process inserted the same idempotency key between our check and our insert.
        with db.read() as session:
            existing = session.scalar(
                select(LedgerEntry).where(LedgerEntry.idempotency_key == idempotency_key)
            )
            if existing is None:
                raise
            return CreditResult(_same_credit(existing, org_id, kind, amount_micros), created=False)


def _same_credit(existing: LedgerEntry, org_id: str, kind: str, amount_micros: int) -> LedgerEntryInfo:
    if (existing.org_id, existing.kind, existing.amount_micros) != (org_id, kind, amount_micros):
        raise IdempotencyConflict(
            "idempotency_key: already used for a different entry "
            f"({existing.kind} of {existing.amount_micros} micros to {existing.org_id})"
        )
    return _entry_info(existing)
