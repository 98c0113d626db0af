"""The audit log: one append-only row per operator change (who, what, on what, when, and the target's state
before and after), written by `admin_ops` and read back by `tokenmill admin audit-log` and the admin API.
States are stored as `snapshot`s, plain JSON; a key's secret can never be part of one. It also records each
attempt of an organization to reach another's content (`record_foreign_access`): the caller is answered as if
the thing did not exist, and the operator can still see that someone tried."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from enum import Enum
from typing import Any

from sqlalchemy import select

from tokenmill.platform.db import Database
from tokenmill.platform.errors import InvalidArgument
from tokenmill.platform.keys import CreatedKey
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.platform.tables import AuditEntry
from tokenmill.platform.validation import optional_int, text

MAX_PAGE = 1000
"""The most rows one `list_audit` call returns: a page, never the whole history in memory."""
MAX_ACTOR_CHARS = 200
MAX_ACTION_CHARS = 64
MAX_TARGET_CHARS = 300
"""The widths of the `audit_log` columns."""
MAX_ID = 2**63 - 1
"""The largest row id either backend can hold (BIGINT)."""

JSON = Any
"""None, bool, int, float, str, list of JSON or dict of str to JSON."""


@dataclass(frozen=True, slots=True)
class AuditInfo:
    id: int
    created_at: datetime
    actor: str
    """Who: `cli:<os user>` for the command line, `admin:<admin key id>` for the HTTP API."""
    action: str
    """What: the name of the `admin_ops` function that made the change."""
    target: str
    """On what: the id (organization, user, key) or name (model, tier) the change is about."""
    before: JSON
    """The target's snapshot just before the change; None when the change created it."""
    after: JSON


def actor_name(actor: object) -> str:
    """`actor` checked as the log will store it. `admin_ops` calls this before changing anything, so a bad
    actor refuses the action instead of leaving a change without its row."""
    return text("actor", actor, max_len=MAX_ACTOR_CHARS)


def snapshot(value: object) -> JSON:
    """`value` as JSON the log can store and an operator can read: dataclasses (OrgInfo, KeyInfo, Price,
    TierLimits, ListingInfo...) become dicts of their fields, datetimes and dates ISO strings, tuples and
    sets sorted lists (they hold sets such as allowed models or tags, whose order means nothing). A
    `CreatedKey` becomes its `info`: the secret is dropped here, whoever passes one. Anything else is a
    programming error (TypeError), never silently stringified."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):  # JSON has no NaN or infinity; PostgreSQL would refuse the row
            raise TypeError("snapshot: a float must be finite")
        return value
    if isinstance(value, CreatedKey):
        return snapshot(value.info)
    if isinstance(value, Enum):
        return snapshot(value.value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: snapshot(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("snapshot: mapping keys must be strings")
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, list):
        return [snapshot(item) for item in value]
    if isinstance(value, tuple | set | frozenset):
        return _sorted([snapshot(item) for item in value])
    raise TypeError(f"snapshot: cannot store a {type(value).__name__} in the audit log")


def record(db: Database, actor: str, action: str, target: str, before: object, after: object) -> AuditInfo:
    """Append one row. Its own transaction: the platform functions it follows commit theirs first, so a
    crash in between can lose the row of a change, never invent a row for a change that did not happen."""
    actor = actor_name(actor)
    action = text("action", action, max_len=MAX_ACTION_CHARS)
    target = text("target", target, max_len=MAX_TARGET_CHARS)
    before_json, after_json = snapshot(before), snapshot(after)
    with db.write() as session:
        row = AuditEntry(
            created_at=db.now(),
            actor=actor,
            action=action,
            target=target,
            before=before_json,
            after=after_json,
        )
        session.add(row)
        session.flush()
        return _info(row)


FOREIGN_ACCESS = "foreign_access"
"""The action of the rows `record_foreign_access` writes."""


def record_foreign_access(
    db: Database,
    caller: str | KeyPrincipal,
    kind: str,
    ref: str,
    *,
    key_id: str | None = None,
    owner_org_id: str | None = None,
) -> AuditInfo:
    """Record that an organization (`caller`: its id, or the principal of the request, which also names the
    key) tried to reach `ref`, a `kind` ("file", "model", ...) that belongs to another organization
    (`owner_org_id`, when the caller knows it). The caller answers the request exactly as for a missing
    `ref`; this row is how the operator learns of it. Actor: `org:<org_id>` or `org:<org_id>/key:<key_id>`;
    action: `foreign_access`; target: `ref`."""
    if isinstance(caller, KeyPrincipal):
        caller, key_id = caller.org_id, key_id or caller.key_id
    org_id = text("org_id", caller, max_len=64)
    actor = f"org:{org_id}" if key_id is None else f"org:{org_id}/key:{text('key_id', key_id, max_len=64)}"
    attempt = {"kind": text("kind", kind, max_len=64), "owner_org_id": owner_org_id}
    return record(db, actor, FOREIGN_ACCESS, ref, None, attempt)


def list_audit(
    db: Database,
    *,
    limit: int = 100,
    before_id: int | None = None,
    action: str | None = None,
    target: str | None = None,
) -> list[AuditInfo]:
    """Newest first. The next page is `before_id=` the last id of this one; `action` and `target` keep
    only rows with exactly that action or target."""
    limit = _required_int("limit", limit, maximum=MAX_PAGE)
    before_id = optional_int("before_id", before_id, minimum=1, maximum=MAX_ID)
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    if action is not None:
        query = query.where(AuditEntry.action == text("action", action, max_len=MAX_ACTION_CHARS))
    if target is not None:
        query = query.where(AuditEntry.target == text("target", target, max_len=MAX_TARGET_CHARS))
    with db.read() as session:
        return [_info(row) for row in session.scalars(query)]


def _info(row: AuditEntry) -> AuditInfo:
    return AuditInfo(
        id=row.id,
        created_at=row.created_at,
        actor=row.actor,
        action=row.action,
        target=row.target,
        before=row.before,
        after=row.after,
    )


def _required_int(field: str, value: object, *, maximum: int) -> int:
    if type(value) is not int or not 1 <= value <= maximum:
        raise InvalidArgument(f"{field}: must be an integer from 1 to {maximum}")
    return value


def _sorted(items: list[JSON]) -> list[JSON]:
    """Plain values sort as themselves; a mix Python cannot compare sorts by its JSON text, still stably."""
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
