"""A gateway's startup on a real database: migrate, release only its own crashed reservations, create the
admin key once, and register the served models without a price as free without touching admin prices."""

from __future__ import annotations

import stat
from pathlib import Path

from sqlalchemy import select

from tests.platform.conftest import EmptyDatabase
from tests.platform.helpers import make_account, unique
from tokenmill.platform.billing import reserve
from tokenmill.platform.gateway import Gateway, PlatformSettings
from tokenmill.platform.pricing import FREE, Price, get_model_price, set_model_price
from tokenmill.platform.tables import Reservation


def _settings(empty: EmptyDatabase, data_dir: Path, gateway_id: str) -> PlatformSettings:
    return PlatformSettings(data_dir=data_dir, database_url=empty.url, gateway_id=gateway_id)


def test_startup_on_a_fresh_then_a_crashed_database(empty_database: EmptyDatabase, tmp_path: Path) -> None:
    first = Gateway.open(_settings(empty_database, tmp_path / "a", "gw-a"))
    try:
        report = first.start()
        assert report.admin_key is not None and report.released_reservation_ids == ()
        key_file = tmp_path / "a" / "admin_key"
        assert key_file.read_text().strip() == report.admin_key
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        account = make_account(first.db, 1_000_000)
        model = unique("model")
        set_model_price(first.db, model, 1_000_000, 1_000_000)
        mine = reserve(first.db, account.principal, model, 10, 10, owner="gw-a")
        theirs = reserve(first.db, account.principal, model, 10, 10, owner="gw-b")
    finally:
        first.close()  # as if killed: both reservations stay open

    restarted = Gateway.open(_settings(empty_database, tmp_path / "a", "gw-a"))
    try:
        report = restarted.start()
        assert report.admin_key is None  # shown once, on the very first start only
        assert report.released_reservation_ids == (mine.id,)  # a live peer's reservation is left alone
        with restarted.db.read() as session:
            states = dict(session.execute(select(Reservation.id, Reservation.state)).all())
        assert states == {mine.id: "released", theirs.id: "open"}
    finally:
        restarted.close()


def test_served_models_without_a_price_become_free(empty_database: EmptyDatabase, tmp_path: Path) -> None:
    gateway = Gateway.open(_settings(empty_database, tmp_path, "gw"))
    try:
        set_model_price(gateway.db, "priced", 2_000_000, 5_000_000)
        assert gateway.register_models(["priced", "new-chat", "new-embed"]) == ["new-chat", "new-embed"]
        assert gateway.register_models(["priced", "new-chat"]) == []  # idempotent
        assert get_model_price(gateway.db, "new-chat") == FREE
        assert get_model_price(gateway.db, "priced") == Price(2_000_000, 5_000_000)
    finally:
        gateway.close()
