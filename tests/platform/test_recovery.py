"""Crash recovery: a process killed with SIGKILL while requests are in flight (one of them half-way
through settling) leaves open reservations; `recover_open_reservations` closes each exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.platform.helpers import make_account, priced_model, reserve_model
from tokenmill.platform.billing import Reservation, recover_open_reservations, settle
from tokenmill.platform.db import Database
from tokenmill.platform.errors import ReservationClosed
from tokenmill.platform.ledger import balance_micros
from tokenmill.platform.pricing import Price
from tokenmill.platform.tables import Reservation as ReservationRow
from tokenmill.platform.tables import UsageRecord
from tokenmill.platform.usage import user_info

REPO_ROOT = Path(__file__).resolve().parents[2]


def _states(db: Database, org_id: str) -> dict[str, int]:
    with db.read() as session:
        return dict(
            session.execute(
                select(ReservationRow.state, func.count())
                .where(ReservationRow.org_id == org_id)
                .group_by(ReservationRow.state)
            ).all()
        )


def test_reservations_left_open_by_a_killed_process_are_released_once(db: Database) -> None:
    account = make_account(db, 1_000_000)
    model = priced_model(db, 1_000_000, 1_000_000)
    url = db.url.render_as_string(hide_password=False)
    child = subprocess.run(
        [sys.executable, "-m", "tests.platform.crash_child", url, account.key.key, model, "5", "4"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    in_flight = json.loads(child.stdout.strip().splitlines()[-1])
    assert _states(db, account.org.id) == {"settled": 5, "open": 4}
    assert user_info(db, account.principal).held_micros == 4 * 30

    released = recover_open_reservations(db)
    assert sorted(i for i in released if i in in_flight) == sorted(in_flight)
    assert _states(db, account.org.id) == {"settled": 5, "released": 4}
    assert recover_open_reservations(db) == []  # a second restart finds nothing to do

    # The uncommitted charge died with the process: the ledger equals the usage records, to the micro.
    with db.read() as session:
        usage_total = session.scalar(
            select(func.sum(UsageRecord.cost_micros)).where(UsageRecord.org_id == account.org.id)
        )
    assert usage_total == 5 * 25
    info = user_info(db, account.principal)
    assert info.balance_micros == balance_micros(db, account.org.id) == 1_000_000 - usage_total
    assert info.available_micros == info.balance_micros  # nothing held any more

    # A late settle from the dead process's point of view cannot charge a released reservation.
    late = Reservation(
        id=in_flight[0],
        org_id=account.org.id,
        key_id=account.key.info.id,
        model=model,
        prompt_tokens=10,
        max_tokens=20,
        price=Price(1_000_000, 1_000_000),
        reserved_micros=30,
        provider_org_id=None,
        platform_fee_bps=10_000,
    )
    with pytest.raises(ReservationClosed):
        settle(db, late, 10, 20, "ok", 1.0)
    assert balance_micros(db, account.org.id) == 1_000_000 - usage_total


def test_recovery_can_spare_the_live_requests_of_other_gateways(db: Database) -> None:
    account = make_account(db, 1_000_000)
    model = priced_model(db, 1_000_000, 1_000_000)
    mine = reserve_model(db, account.principal, model, 1, 1, owner="gateway-a")
    theirs = reserve_model(db, account.principal, model, 1, 1, owner="gateway-b")
    assert recover_open_reservations(db, owner="gateway-a") == [mine.id]
    assert recover_open_reservations(db, owner="gateway-b", opened_before=db.now() - timedelta(hours=1)) == []
    settle(db, theirs, 1, 1, "ok", 0.1)  # the peer's request completes normally
    assert _states(db, account.org.id) == {"released": 1, "settled": 1}
