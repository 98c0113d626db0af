"""An organization's statement over HTTP, on SQLite and PostgreSQL, with real billing in front of FakeEngines:
GET /v1/usage/requests lists each request exactly as it was billed, GET /v1/ledger each entry and the balance
they add up to, GET /v1/usage?format=csv the daily report as a CSV whose columns sum to the JSON totals; pages
neither skip nor repeat a row, and no organization ever sees another's."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.platform.conftest import BACKENDS, EmptyDatabase
from tests.platform.helpers import Account, make_account
from tests.serving.conftest import wait_ready
from tests.serving.fake_engine import FakeEngine
from tokenmill.platform.gateway import Gateway, PlatformSettings
from tokenmill.platform.pricing import set_model_price
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

MODELS = ("fake-chat", "fake-chat-b")
INPUT_MICROS = {"fake-chat": 1, "fake-chat-b": 2}
OUTPUT_MICROS = {"fake-chat": 3, "fake-chat-b": 5}
"""Per token (set as per-1M prices), so every cost is an exact integer the test can compute."""
SEED = 10_000_000


@pytest.fixture(params=BACKENDS)
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    empty = EmptyDatabase(request.param, tmp_path)
    opened = Gateway.open(PlatformSettings(data_dir=tmp_path / "data", database_url=empty.url))
    opened.start()
    yield opened
    opened.close()
    empty.drop()


@pytest.fixture
def client(gateway: Gateway, smollm2_tokenizer: Any) -> Iterator[TestClient]:
    engines = {model: FakeEngine(smollm2_tokenizer, model_id=model, step_delay_s=0) for model in MODELS}
    gateway.register_models(MODELS)
    for model in MODELS:
        set_model_price(gateway.db, model, INPUT_MICROS[model] * 1_000_000, OUTPUT_MICROS[model] * 1_000_000)
    app = create_app(engines, {}, ServerSettings(), gateway)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        wait_ready(test_client)
        yield test_client


def _bearer(account: Account) -> dict[str, str]:
    return {"Authorization": f"Bearer {account.key.key}"}


def _chat(client: TestClient, account: Account, model: str, max_tokens: int) -> dict[str, int]:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me."}], "max_tokens": max_tokens}
    response = client.post("/v1/chat/completions", headers=_bearer(account), json=body)
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def _cost(model: str, usage: dict[str, int]) -> int:
    return usage["prompt_tokens"] * INPUT_MICROS[model] + usage["completion_tokens"] * OUTPUT_MICROS[model]


def _get(client: TestClient, account: Account, path: str, **query: Any) -> dict[str, Any]:
    params = {name: value for name, value in query.items() if value is not None}
    response = client.get(path, headers=_bearer(account), params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _all_pages(client: TestClient, account: Account, path: str, limit: int, **query: Any) -> list[list[dict]]:
    pages, after = [], None
    while True:
        page = _get(client, account, path, limit=limit, after=after, **query)
        pages.append(page["data"])
        assert page["last_id"] == (page["data"][-1]["id"] if page["data"] else None)
        if not page["has_more"]:
            return pages
        after = page["last_id"]


def test_requests_and_ledger_show_exactly_what_was_billed(client: TestClient, gateway: Gateway) -> None:
    buyer = make_account(gateway.db, SEED)
    made = [
        (model, _chat(client, buyer, model, n))
        for model, n in [(MODELS[0], 3), (MODELS[1], 5), (MODELS[0], 7)]
    ]

    listed = _get(client, buyer, "/v1/usage/requests")
    rows = listed["data"]
    assert listed["has_more"] is False and len(rows) == 3
    assert [row["id"] for row in rows] == sorted((row["id"] for row in rows), reverse=True)  # newest first
    for row, (model, usage) in zip(rows, reversed(made), strict=True):
        assert (row["model"], row["prompt_tokens"], row["completion_tokens"]) == (
            model,
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        assert row["total_tokens"] == usage["total_tokens"] and row["cost_micros"] == _cost(model, usage)
        assert row["status"] == "ok" and row["key_prefix"] == buyer.key.info.prefix
        assert row["latency_ms"] >= 0 and row["created_at"] > 0
    assert rows[0]["created_at"] >= rows[-1]["created_at"]

    ledger = _get(client, buyer, "/v1/ledger")
    charges = [entry for entry in ledger["data"] if entry["kind"] == "charge"]
    assert [(c["request_id"], c["model"], -c["amount_micros"]) for c in charges] == [
        (row["id"], row["model"], row["cost_micros"]) for row in rows
    ]
    (topup,) = [entry for entry in ledger["data"] if entry["kind"] == "topup"]
    assert topup["amount_micros"] == SEED and topup["request_id"] is None
    assert ledger["data"][-1] == topup  # the oldest entry: it came before every charge
    spent = sum(row["cost_micros"] for row in rows)
    assert ledger["balance_micros"] == SEED - spent == sum(e["amount_micros"] for e in ledger["data"])
    info = _get(client, buyer, "/v1/user/info")["data"]
    assert info["balance_micros"] == ledger["balance_micros"]

    only_topups = _get(client, buyer, "/v1/ledger", kind="topup")["data"]
    assert only_topups == [topup]
    only_b = _get(client, buyer, "/v1/usage/requests", model=MODELS[1])["data"]
    assert [row["id"] for row in only_b] == [rows[1]["id"]]


def test_another_organizations_rows_never_appear(client: TestClient, gateway: Gateway) -> None:
    mine, theirs = make_account(gateway.db, SEED), make_account(gateway.db, SEED)
    _chat(client, mine, MODELS[0], 2)
    _chat(client, theirs, MODELS[0], 4)
    _chat(client, theirs, MODELS[1], 4)

    for account, count in ((mine, 1), (theirs, 2)):
        rows = _get(client, account, "/v1/usage/requests")["data"]
        assert len(rows) == count and {row["key_id"] for row in rows} == {account.key.info.id}
        entries = _get(client, account, "/v1/ledger")["data"]
        assert len(entries) == count + 1  # its charges and its own top-up
    their_ids = {row["id"] for row in _get(client, theirs, "/v1/usage/requests")["data"]}
    # Even pointing the cursor past their rows shows none of them to me.
    after_theirs = _get(client, mine, "/v1/usage/requests", after=max(their_ids) + 1)["data"]
    assert their_ids.isdisjoint(row["id"] for row in after_theirs) and len(after_theirs) == 1


def test_pages_have_no_gaps_or_duplicates_even_while_requests_arrive(
    client: TestClient, gateway: Gateway
) -> None:
    buyer = make_account(gateway.db, SEED)
    for n in range(1, 8):
        _chat(client, buyer, MODELS[n % 2], n)
    full = _get(client, buyer, "/v1/usage/requests", limit=500)["data"]
    assert len(full) == 7

    first = _get(client, buyer, "/v1/usage/requests", limit=3)
    assert first["has_more"] is True and [r["id"] for r in first["data"]] == [r["id"] for r in full[:3]]
    _chat(client, buyer, MODELS[0], 1)  # newer than every row paged so far: it must not shift the pages
    second = _get(client, buyer, "/v1/usage/requests", limit=3, after=first["last_id"])
    third = _get(client, buyer, "/v1/usage/requests", limit=3, after=second["last_id"])
    assert second["has_more"] is True and third["has_more"] is False
    paged = [r["id"] for r in first["data"] + second["data"] + third["data"]]
    assert paged == [r["id"] for r in full] and len(set(paged)) == 7

    fresh = _all_pages(client, buyer, "/v1/usage/requests", limit=3)  # a new walk starts with the new one
    assert [len(page) for page in fresh] == [3, 3, 2]
    assert [r["id"] for page in fresh for r in page][1:] == paged

    ledger_pages = _all_pages(client, buyer, "/v1/ledger", limit=2)
    entries = [e["id"] for page in ledger_pages for e in page]
    assert len(entries) == len(set(entries)) == 9  # eight charges and the top-up
    assert entries == sorted(entries, reverse=True)
    assert [e["id"] for e in _get(client, buyer, "/v1/ledger", limit=500)["data"]] == entries


def test_csv_export_parses_and_sums_to_the_reports_totals(client: TestClient, gateway: Gateway) -> None:
    buyer = make_account(gateway.db, SEED)
    usages = [_chat(client, buyer, MODELS[n % 2], n + 2) for n in range(4)]
    today = gateway.db.now().date()
    dates = {"start_date": (today - timedelta(days=6)).isoformat(), "end_date": today.isoformat()}

    response = client.get("/v1/usage", headers=_bearer(buyer), params={**dates, "format": "csv"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    report = _get(client, buyer, "/v1/usage", **dates)
    assert len(rows) == len(report["data"]) == 2  # today, one row per model
    assert {row["model"] for row in rows} == set(MODELS) and {row["date"] for row in rows} == {
        today.isoformat()
    }
    assert sum(int(row["total_tokens"]) for row in rows) == sum(u["total_tokens"] for u in usages)
    assert sum(int(row["prompt_tokens"]) + int(row["completion_tokens"]) for row in rows) == sum(
        u["total_tokens"] for u in usages
    )
    assert sum(int(row["cost_micros"]) for row in rows) == report["total_cost_micros"]
    assert sum(int(row["num_requests"]) for row in rows) == 4
    requests = _get(client, buyer, "/v1/usage/requests", **dates)["data"]
    assert report["total_cost_micros"] == sum(r["cost_micros"] for r in requests)

    before = {"start_date": "2020-01-01", "end_date": "2020-01-31"}
    empty = client.get("/v1/usage", headers=_bearer(buyer), params={**before, "format": "csv"})
    assert empty.text.splitlines() == [",".join(next(csv.reader([response.text.splitlines()[0]])))]
    assert _get(client, buyer, "/v1/usage/requests", **before)["data"] == []


@pytest.mark.parametrize(
    ("path", "query", "param"),
    [
        ("/v1/usage/requests", {"limit": 0}, "limit"),
        ("/v1/usage/requests", {"limit": 501}, "limit"),
        ("/v1/usage/requests", {"after": 0}, "after"),
        ("/v1/usage/requests", {"start_date": "2025-02-01", "end_date": "2025-01-01"}, "start_date"),
        ("/v1/usage/requests", {"model": "nul\x00byte"}, "model"),
        ("/v1/usage/requests", {"end_date": "0001-01-01"}, None),  # the default start is not before year 1
        ("/v1/ledger", {"limit": 501}, "limit"),
        ("/v1/ledger", {"kind": "gift"}, "kind"),
        ("/v1/usage", {"format": "xml"}, "format"),
    ],
)
def test_bad_queries_are_400s_naming_the_parameter(
    client: TestClient, gateway: Gateway, path: str, query: dict[str, Any], param: str | None
) -> None:
    buyer = make_account(gateway.db)
    response = client.get(path, headers=_bearer(buyer), params=query)
    if param is None:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param or param in error["message"], error


@pytest.mark.parametrize("path", ["/v1/usage/requests", "/v1/ledger", "/v1/usage?format=csv"])
def test_no_key_no_statement(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 401
