"""A gateway's startup on a real database: migrate, release only its own crashed reservations, create the
admin key once, and register the served models without a price as free and without a listing as the
platform's own, without touching admin prices or existing listings."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.platform.conftest import EmptyDatabase
from tests.platform.helpers import make_account, priced_model, reserve_model
from tokenmill.platform.errors import InvalidArgument
from tokenmill.platform.gateway import Gateway, PlatformSettings
from tokenmill.platform.listing_terms import ListingSpec
from tokenmill.platform.listings import PLATFORM_PROVIDER, apply_listing, get_listing, set_listing_status
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
        model = priced_model(first.db, 1_000_000, 1_000_000)
        mine = reserve_model(first.db, account.principal, model, 10, 10, owner="gw-a")
        theirs = reserve_model(first.db, account.principal, model, 10, 10, owner="gw-b")
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


def test_served_models_without_a_price_become_free_public_platform_models(
    empty_database: EmptyDatabase, tmp_path: Path
) -> None:
    gateway = Gateway.open(_settings(empty_database, tmp_path, "gw"))
    try:
        set_model_price(gateway.db, "priced", 2_000_000, 5_000_000)
        apply_listing(gateway.db, ListingSpec("declared", description="from models.yaml", price=FREE))
        set_listing_status(gateway.db, "declared", "retired")
        assert gateway.register_models(["priced", "new-chat", "declared"]) == ["new-chat"]
        assert gateway.register_models(["new-embed"], task="embedding") == ["new-embed"]
        assert gateway.register_models(["priced", "new-chat"]) == []  # idempotent
        assert get_model_price(gateway.db, "new-chat") == FREE
        assert get_model_price(gateway.db, "priced") == Price(2_000_000, 5_000_000)

        listings = {m: get_listing(gateway.db, m) for m in ("priced", "new-chat", "new-embed", "declared")}
        assert {m: (x.provider, x.visibility, x.status, x.task) for m, x in listings.items()} == {
            "priced": (PLATFORM_PROVIDER, "public", "published", "chat"),
            "new-chat": (PLATFORM_PROVIDER, "public", "published", "chat"),
            "new-embed": (PLATFORM_PROVIDER, "public", "published", "embedding"),
            "declared": (PLATFORM_PROVIDER, "public", "retired", "chat"),  # an existing listing is untouched
        }
        assert listings["priced"].price == Price(2_000_000, 5_000_000)
        assert listings["declared"].description == "from models.yaml"

        buyer = make_account(gateway.db)
        listing = gateway.resolve(buyer.principal, "new-chat")
        assert listing.fee_bps(gateway.admission.default_fee_bps) == 10_000  # the platform's own: all of it
    finally:
        gateway.close()


def test_the_platform_fee_setting_is_checked_and_reaches_admission(
    empty_database: EmptyDatabase, tmp_path: Path
) -> None:
    for fee in (-1, 10_001, 20.0, None):
        with pytest.raises(InvalidArgument, match="^platform_fee_bps: must be an integer from 0 to 10000$"):
            PlatformSettings(data_dir=tmp_path, platform_fee_bps=fee)  # type: ignore[arg-type]
    settings = PlatformSettings(
        data_dir=tmp_path, database_url=empty_database.url, gateway_id="gw", platform_fee_bps=1234
    )
    gateway = Gateway.open(settings)
    try:
        assert gateway.admission.default_fee_bps == 1234
    finally:
        gateway.close()
