"""A provider manages its listings' lifecycle over HTTP, on SQLite and on PostgreSQL, through the real app
and platform in front of a FakeEngine: it sees its own listings in every status (GET /v1/provider/listings),
publishes its draft (buyers can then call it), renames and retags it (the catalog shows it), retires it
(new requests are refused, one already streaming finishes and is billed), and cannot bring it back or touch
another provider's listing. Every refusal is OpenAI's error shape naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.platform.conftest import BACKENDS, EmptyDatabase
from tests.platform.helpers import Account, make_account
from tests.serving.conftest import LiveServer
from tests.serving.fake_engine import FakeEngine
from tokenmill.platform.gateway import Gateway, PlatformSettings
from tokenmill.platform.listing_terms import ListingSpec
from tokenmill.platform.listings import DEFAULT_PLATFORM_FEE_BPS, apply_listing
from tokenmill.platform.pricing import Price
from tokenmill.platform.tables import UsageRecord
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

DRAFT = "acme/draft-7b"
ELSEWHERE = "acme/served-elsewhere"
"""Listed in the shared database, served by no engine of this app."""
PRICE = Price(2_000_000, 4_000_000)
USER = [{"role": "user", "content": "Tell me something."}]


@dataclass
class Market:
    http: httpx.Client
    gateway: Gateway
    provider: Account
    buyer: Account
    stranger: Account

    def call(self, who: Account, method: str, path: str, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {who.key.key}"}
        return self.http.request(method, path, headers=headers, json=body)

    def edit(self, who: Account, model: str, body: dict[str, Any]) -> httpx.Response:
        return self.call(who, "PATCH", f"/v1/catalog/models/{model}", body)

    def chat(self, who: Account, **extra: Any) -> httpx.Response:
        return self.call(who, "POST", "/v1/chat/completions", {"model": DRAFT, "messages": USER, **extra})

    def own(self, who: Account) -> dict[str, dict[str, Any]]:
        response = self.call(who, "GET", "/v1/provider/listings")
        assert response.status_code == 200, response.text
        return {listing["id"]: listing for listing in response.json()["data"]}

    def catalog(self, who: Account) -> dict[str, dict[str, Any]]:
        response = self.call(who, "GET", "/v1/catalog/models")
        assert response.status_code == 200, response.text
        return {model["id"]: model for model in response.json()["data"]}


@pytest.fixture(params=BACKENDS)
def market(request: pytest.FixtureRequest, tmp_path: Path, smollm2_tokenizer: Any) -> Iterator[Market]:
    empty = EmptyDatabase(request.param, tmp_path)
    settings = PlatformSettings(data_dir=tmp_path / "data", database_url=empty.url, gateway_id="providers")
    gateway = Gateway.open(settings)
    try:
        gateway.start()
        db = gateway.db
        provider, buyer, stranger = make_account(db), make_account(db, 10_000_000), make_account(db)
        spec = ListingSpec(
            DRAFT, provider=provider.org.id, display_name="Draft 7B", price=PRICE, status="draft"
        )
        apply_listing(db, spec)
        apply_listing(db, ListingSpec(ELSEWHERE, provider=provider.org.id, tags=("chat",)))
        engine = FakeEngine(smollm2_tokenizer, DRAFT, step_delay_s=0.02)
        app = create_app({DRAFT: engine}, {}, ServerSettings(max_body_bytes=64 * 1024), gateway)
        with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as http:
            yield Market(http, gateway, provider, buyer, stranger)
    finally:
        gateway.close()
        empty.drop()


def _error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return str(error["message"])


def test_a_provider_publishes_its_draft_retires_it_and_cannot_revive_it(market: Market) -> None:
    provider, buyer, stranger = market.provider, market.buyer, market.stranger
    own = market.own(provider)
    assert list(own) == [DRAFT, ELSEWHERE]  # every status, served here or not, by model id
    assert own[DRAFT]["yours"] == {
        "status": "draft",
        "visibility": "public",
        "shared_with": [],
        "platform_fee_bps": DEFAULT_PLATFORM_FEE_BPS,
    }
    assert (own[DRAFT]["display_name"], own[DRAFT]["task"], own[DRAFT]["pricing"]["input_per_1m"]) == (
        "Draft 7B",
        "chat",
        "2.000000",
    )
    assert market.own(buyer) == {} and market.own(stranger) == {}
    _error(market.chat(buyer), 404, "model", "model_not_found")
    assert DRAFT not in market.catalog(buyer)

    # Retiring a draft, or any status but the two a provider may set, is refused and changes nothing.
    message = _error(market.edit(provider, DRAFT, {"status": "retired"}), 409, "status", "conflict")
    assert message == "Only a published listing can be retired (this one is draft)"
    _error(market.edit(provider, DRAFT, {"status": "draft"}), 400, "status")
    # Another organization's attempt is the 404 of a model that does not exist.
    hijack = market.edit(stranger, DRAFT, {"status": "published"})
    unknown = market.edit(stranger, "acme/nope", {"status": "published"})
    assert _error(hijack, 404, "model", "model_not_found") == _error(unknown, 404, "model").replace(
        "acme/nope", DRAFT
    )
    assert market.own(provider)[DRAFT]["yours"]["status"] == "draft"

    published = market.edit(provider, DRAFT, {"status": "published"})
    assert published.status_code == 200, published.text
    assert published.json()["yours"]["status"] == "published"
    assert market.chat(buyer, max_tokens=2).status_code == 200
    assert market.catalog(buyer)[DRAFT]["display_name"] == "Draft 7B"

    # Retiring stops new requests only: a stream already admitted finishes and is billed.
    with market.http.stream(
        "POST",
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {buyer.key.key}"},
        json={"model": DRAFT, "messages": USER, "max_tokens": 12, "stream": True},
    ) as streaming:
        assert streaming.status_code == 200
        lines = streaming.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        retired = market.edit(provider, DRAFT, {"status": "retired"})
        assert retired.status_code == 200, retired.text
        assert retired.json()["yours"]["status"] == "retired"
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
    with market.gateway.db.read() as session:
        records = session.scalars(select(UsageRecord).where(UsageRecord.org_id == buyer.org.id)).all()
    assert [record.status for record in records] == ["ok", "ok"] and records[-1].cost_micros > 0

    _error(market.chat(buyer), 404, "model", "model_not_found")
    _error(market.chat(provider), 410, "model", "model_retired")
    assert DRAFT not in market.catalog(buyer) and DRAFT not in market.catalog(provider)
    assert market.own(provider)[DRAFT]["yours"]["status"] == "retired"
    # Only the operator brings it back.
    for status in ("published", "retired"):
        message = _error(market.edit(provider, DRAFT, {"status": status}), 409, "status", "conflict")
        assert "only the server's operator can bring it back" in message
    _error(market.edit(provider, DRAFT, {"description": "Back?"}), 410, "model", "model_retired")
    assert market.own(provider)[DRAFT]["yours"]["status"] == "retired"


def test_a_provider_renames_and_retags_and_the_catalog_shows_it(market: Market) -> None:
    provider, buyer, stranger = market.provider, market.buyer, market.stranger
    body = {"display_name": "Draft 7B Turbo", "tags": ["chat", "fast", "chat"], "status": "published"}
    edited = market.edit(provider, DRAFT, body)
    assert edited.status_code == 200, edited.text
    assert (edited.json()["display_name"], edited.json()["tags"]) == ("Draft 7B Turbo", ["chat", "fast"])
    seen = market.catalog(buyer)[DRAFT]
    assert (seen["display_name"], seen["tags"], seen["provider"]) == (
        "Draft 7B Turbo",
        ["chat", "fast"],
        provider.org.name,
    )
    assert market.own(provider)[DRAFT]["tags"] == ["chat", "fast"]

    # The operator's rules for names and tags, each refusal naming its field and changing nothing.
    for refused, param in [
        ({"display_name": ""}, "display_name"),
        ({"display_name": "   "}, "display_name"),
        ({"display_name": "x" * 201}, "display_name"),
        ({"tags": ["x" * 51]}, "tags[0]"),
        ({"tags": [" "]}, "tags"),
        ({"tags": [f"t{i}" for i in range(33)]}, "tags"),
        ({"tags": "chat"}, "tags"),
        ({"status": "gone"}, "status"),
    ]:
        _error(market.edit(provider, DRAFT, refused), 400, param)
    hijack = market.edit(stranger, DRAFT, {"display_name": "Mine"})
    _error(hijack, 404, "model", "model_not_found")
    assert market.catalog(buyer)[DRAFT]["display_name"] == "Draft 7B Turbo"

    # A listing that another gateway serves is edited from here too (no engine for it on this one).
    elsewhere = market.edit(provider, ELSEWHERE, {"display_name": "Elsewhere", "tags": []})
    assert elsewhere.status_code == 200, elsewhere.text
    assert (elsewhere.json()["tags"], elsewhere.json()["state"]) == ([], "stopped")
    assert market.own(provider)[ELSEWHERE]["display_name"] == "Elsewhere"
