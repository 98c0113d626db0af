"""The off-peak window: when it is open (in the configured time zone, also across midnight), live requests
pay the off-peak discount and every engine gets the off-peak batch budget; outside it, neither."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.platform.helpers import make_account
from tests.serving.conftest import wait_ready
from tests.serving.fake_engine import FakeEngine
from tokenmill.config import BatchBudget, ConfigError
from tokenmill.platform.gateway import Gateway
from tokenmill.platform.pricing import Price, cost_micros, discounted, set_model_price
from tokenmill.platform.tables import UsageRecord
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings
from tokenmill.serving.tidal import TidalSchedule, TidalSettings

NIGHT = BatchBudget(max_slowdown=1.0, fill_tokens=48, idle_tokens=256)


def test_the_window_follows_its_time_zone_and_wraps_past_midnight() -> None:
    schedule = TidalSchedule(TidalSettings(off_peak="22:00-06:00", timezone="Asia/Shanghai"))  # UTC+8
    assert schedule.is_off_peak(datetime(2026, 1, 1, 15, 0, tzinfo=UTC))  # 23:00 in Shanghai
    assert schedule.is_off_peak(datetime(2026, 1, 1, 21, 59, tzinfo=UTC))  # 05:59
    assert not schedule.is_off_peak(datetime(2026, 1, 1, 22, 0, tzinfo=UTC))  # 06:00
    assert not TidalSchedule(TidalSettings()).is_off_peak()
    for bad in ({"off_peak": "25:00-01:00"}, {"timezone": "Mars/Olympus"}, {"batch_discount_bps": 10_001}):
        with pytest.raises(ConfigError):
            TidalSettings(**bad)


def _open_now() -> str:
    now = datetime.now(UTC)
    return f"{(now - timedelta(hours=1)):%H:%M}-{(now + timedelta(hours=1)):%H:%M}"


@pytest.fixture
def off_peak_client(
    fake_engine: FakeEngine, settings: ServerSettings, gateway: Gateway
) -> Iterator[TestClient]:
    gateway.register_models(["fake-chat"])
    tidal = TidalSettings(off_peak=_open_now(), off_peak_live_discount_bps=2_500, off_peak_batch_budget=NIGHT)
    app = create_app({"fake-chat": fake_engine}, {}, replace(settings, no_auth=False, tidal=tidal), gateway)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


def test_off_peak_discounts_live_requests_and_widens_the_batch_budget(
    off_peak_client: TestClient, gateway: Gateway, fake_engine: FakeEngine
) -> None:
    price = Price(4_000_000, 8_000_000)
    set_model_price(gateway.db, "fake-chat", price.input_micros_per_mtok, price.output_micros_per_mtok)
    account = make_account(gateway.db, 1_000_000)
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    response = off_peak_client.post(
        "/v1/chat/completions", headers={"Authorization": f"Bearer {account.key.key}"}, json=body
    )
    assert response.status_code == 200
    usage = response.json()["usage"]
    with gateway.db.read() as session:
        (record,) = session.scalars(select(UsageRecord).where(UsageRecord.org_id == account.org.id)).all()
    assert record.cost_micros == cost_micros(
        usage["prompt_tokens"], usage["completion_tokens"], discounted(price, 2_500)
    )
    deadline = time.monotonic() + 5
    while fake_engine.batch_budget != NIGHT:  # the dispatcher sets it on its next pass
        assert time.monotonic() < deadline
        time.sleep(0.01)
