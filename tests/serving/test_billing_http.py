"""Billing and rate limits through the HTTP layer, with a real platform (SQLite) in front of the FakeEngine:
the engine's token counts are charged exactly, refusals happen before the engine sees anything, and every
ending (finished, dropped, failed, refused by the engine) leaves no reservation open."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.platform.helpers import Account, make_account
from tests.serving.conftest import LiveServer, wait_ready
from tests.serving.fake_engine import FakeEngine
from tokenmill.engine.embedder import Embedder
from tokenmill.platform.gateway import Gateway
from tokenmill.platform.ledger import balance_micros
from tokenmill.platform.pricing import set_model_price
from tokenmill.platform.tables import Reservation, UsageRecord
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

USER = [{"role": "user", "content": "Tell me something."}]
INPUT_MICROS, OUTPUT_MICROS = 1, 3
"""Per token; set as per-1M prices below, so every cost is an exact integer."""


def _bearer(account: Account) -> dict[str, str]:
    return {"Authorization": f"Bearer {account.key.key}"}


@pytest.fixture
def priced(gateway: Gateway) -> Iterator[None]:
    set_model_price(gateway.db, "fake-chat", INPUT_MICROS * 1_000_000, OUTPUT_MICROS * 1_000_000)
    yield


def _records(gateway: Gateway, account: Account) -> list[UsageRecord]:
    with gateway.db.read() as session:
        return list(session.scalars(select(UsageRecord).where(UsageRecord.org_id == account.org.id)))


def _open_reservations(gateway: Gateway, account: Account) -> int:
    with gateway.db.read() as session:
        query = select(func.count()).where(Reservation.org_id == account.org.id, Reservation.state == "open")
        return int(session.scalar(query) or 0)


def _poll(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_charges_the_engines_token_counts_exactly(
    billed_client: TestClient, gateway: Gateway, priced: None, stream: bool
) -> None:
    account = make_account(gateway.db, 1_000_000)
    body = {"model": "fake-chat", "messages": USER, "max_tokens": 6, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    response = billed_client.post("/v1/chat/completions", headers=_bearer(account), json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-ratelimit-limit-requests"] == "600"  # the default tier, on a paid model
    assert int(response.headers["x-ratelimit-remaining-requests"]) == 599
    if stream:
        usage = httpx.Response(200, content=response.text.split("data: ")[-2]).json()["usage"]
    else:
        usage = response.json()["usage"]
    cost = usage["prompt_tokens"] * INPUT_MICROS + usage["completion_tokens"] * OUTPUT_MICROS
    (record,) = _records(gateway, account)  # settled before the response (or its [DONE]) went out
    assert (record.status, record.prompt_tokens, record.completion_tokens) == (
        "ok",
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert record.cost_micros == cost and balance_micros(gateway.db, account.org.id) == 1_000_000 - cost
    assert _open_reservations(gateway, account) == 0


def test_refused_for_quota_before_the_engine_sees_it(
    billed_client: TestClient, gateway: Gateway, fake_engine: FakeEngine, priced: None
) -> None:
    account = make_account(gateway.db, 50)
    body = {"model": "fake-chat", "messages": USER, "max_tokens": 100, "stream": True}
    response = billed_client.post("/v1/chat/completions", headers=_bearer(account), json=body)
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "insufficient_quota" and "retry-after" not in response.headers
    assert fake_engine.submitted == [] and _records(gateway, account) == []
    assert balance_micros(gateway.db, account.org.id) == 50 and _open_reservations(gateway, account) == 0


def test_the_request_over_the_limit_gets_429_with_retry_after(
    billed_client: TestClient, gateway: Gateway, fake_engine: FakeEngine
) -> None:
    account = make_account(gateway.db, requests_per_minute=2)
    body = {"model": "fake-chat", "messages": USER, "max_tokens": 2}
    for remaining in ("1", "0"):
        ok = billed_client.post("/v1/chat/completions", headers=_bearer(account), json=body)
        assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-requests"] == remaining
    refused = billed_client.post("/v1/chat/completions", headers=_bearer(account), json=body)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(fake_engine.submitted) == 2


def test_free_models_get_the_tiers_free_limits(
    billed_client: TestClient, gateway: Gateway, fake_engine: FakeEngine
) -> None:
    account = make_account(gateway.db, 1_000_000)
    body = {"model": "fake-chat", "messages": USER, "max_tokens": 2}
    free = billed_client.post("/v1/chat/completions", headers=_bearer(account), json=body)
    set_model_price(gateway.db, "fake-chat", 1, 1)
    paid = billed_client.post("/v1/chat/completions", headers=_bearer(account), json=body)
    assert free.headers["x-ratelimit-limit-requests"] == "120"  # the default tier's free-model limit
    assert paid.headers["x-ratelimit-limit-requests"] == "600"  # and its paid-model limit
    assert paid.headers["x-ratelimit-remaining-requests"] == "599"  # counted apart from the free request


def test_engine_failure_charges_nothing(
    billed_client: TestClient, gateway: Gateway, fake_engine: FakeEngine, priced: None
) -> None:
    account = make_account(gateway.db, 1_000_000)
    fake_engine.fail_with = RuntimeError("the GPU fell off")
    body = {"model": "fake-chat", "messages": USER, "max_tokens": 6}
    streamed = billed_client.post(
        "/v1/chat/completions", headers=_bearer(account), json={**body, "stream": True}
    )
    assert '"type":"server_error"' in streamed.text.replace(" ", "")
    assert billed_client.post("/v1/chat/completions", headers=_bearer(account), json=body).status_code == 500
    records = _records(gateway, account)
    assert [(r.status, r.cost_micros) for r in records] == [("error", 0), ("error", 0)]
    assert (
        balance_micros(gateway.db, account.org.id) == 1_000_000 and _open_reservations(gateway, account) == 0
    )


def test_engine_validation_error_releases_the_reservation(
    billed_client: TestClient, gateway: Gateway, priced: None
) -> None:
    account = make_account(gateway.db, 1_000_000)
    body = {"model": "fake-chat", "prompt": [5] * 1000, "max_tokens": 100}  # past the 1024-token window
    response = billed_client.post("/v1/completions", headers=_bearer(account), json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert _records(gateway, account) == [] and _open_reservations(gateway, account) == 0
    assert balance_micros(gateway.db, account.org.id) == 1_000_000


def test_completions_reserve_for_every_prompt_and_sample(
    billed_client: TestClient, gateway: Gateway, priced: None
) -> None:
    body = {"model": "fake-chat", "prompt": [[5, 6, 7], [8, 9]], "n": 2, "max_tokens": 10}
    worst_case = 5 * INPUT_MICROS + 2 * 2 * 10 * OUTPUT_MICROS  # 125 micros
    poor = make_account(gateway.db, worst_case - 1)
    refused = billed_client.post("/v1/completions", headers=_bearer(poor), json=body)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    rich = make_account(gateway.db, worst_case)
    usage = billed_client.post("/v1/completions", headers=_bearer(rich), json=body).json()["usage"]
    (record,) = _records(gateway, rich)
    assert (
        record.cost_micros
        == usage["prompt_tokens"] * INPUT_MICROS + usage["completion_tokens"] * OUTPUT_MICROS
    )


def test_a_dropped_stream_pays_for_what_was_generated(
    fake_engine: FakeEngine, gateway: Gateway, priced: None
) -> None:
    gateway.register_models(["fake-chat"])
    fake_engine.endless, fake_engine.step_delay_s = True, 0.01
    account = make_account(gateway.db, 1_000_000)
    body = {"model": "fake-chat", "messages": USER, "max_tokens": 500, "stream": True}
    with LiveServer(create_app({"fake-chat": fake_engine}, {}, ServerSettings(), gateway)) as live:
        _poll(lambda: httpx.get(f"{live.url}/ready").status_code == 200)
        with (
            httpx.Client(timeout=10) as http,
            http.stream("POST", f"{live.url}/v1/chat/completions", json=body, headers=_bearer(account)) as r,
        ):
            lines = r.iter_lines()
            for _ in range(10):
                next(lines)
        _poll(lambda: len(_records(gateway, account)) == 1)
    (record,) = _records(gateway, account)
    generated = fake_engine.stats().num_generated_tokens
    assert record.status == "client_disconnected" and 0 < record.completion_tokens == generated < 500
    assert record.cost_micros == record.prompt_tokens * INPUT_MICROS + generated * OUTPUT_MICROS
    assert balance_micros(gateway.db, account.org.id) == 1_000_000 - record.cost_micros
    assert _open_reservations(gateway, account) == 0


def test_embeddings_are_billed_by_their_tokens(
    fake_engine: FakeEngine, minilm: Embedder, gateway: Gateway, settings: ServerSettings
) -> None:
    gateway.register_models(["fake-chat"])
    gateway.register_models(["all-MiniLM-L6-v2"], task="embedding")
    set_model_price(gateway.db, "all-MiniLM-L6-v2", 7_000_000, 0)
    account = make_account(gateway.db, 1_000_000)
    app = create_app(
        {"fake-chat": fake_engine}, {"all-MiniLM-L6-v2": minilm}, replace(settings, no_auth=False), gateway
    )
    with TestClient(app) as client:
        wait_ready(client)
        body = {"model": "all-MiniLM-L6-v2", "input": ["hello world", "a second, longer sentence"]}
        response = client.post("/v1/embeddings", headers=_bearer(account), json=body)
        too_long = client.post(
            "/v1/embeddings", headers=_bearer(account), json={**body, "input": "word " * 600}
        )
    assert response.status_code == 200 and too_long.status_code == 400
    num_tokens = response.json()["usage"]["prompt_tokens"]
    (record,) = _records(gateway, account)  # the refused input left no record and no reservation
    assert (record.prompt_tokens, record.completion_tokens, record.cost_micros) == (
        num_tokens,
        0,
        7 * num_tokens,
    )
    assert _open_reservations(gateway, account) == 0
