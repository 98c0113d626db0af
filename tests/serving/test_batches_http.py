"""The Batch API over HTTP with a real platform (SQLite) in front of the FakeEngine: lines answered through
the same routes as live requests, each charged the batch's discounted price exactly once, bad lines answered
with their error and charged nothing, files refused as a whole with line numbers, cancel and list."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.platform.helpers import Account, make_account
from tests.serving.fake_engine import FakeEngine
from tokenmill.engine.sampling_params import Priority
from tokenmill.platform.gateway import Gateway
from tokenmill.platform.ledger import balance_micros
from tokenmill.platform.pricing import Price, cost_micros, discounted, set_model_price
from tokenmill.platform.tables import Reservation, UsageRecord

PRICE = Price(2_000_000, 6_000_000)  # 2 and 6 micros per token: every cost is an exact integer


def _bearer(account: Account) -> dict[str, str]:
    return {"Authorization": f"Bearer {account.key.key}"}


def _upload(client: TestClient, account: Account, lines: list[Any], purpose: str = "batch") -> str:
    content = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    response = client.post(
        "/v1/files",
        headers=_bearer(account),
        files={"file": ("input.jsonl", content.encode(), "application/jsonl")},
        data={"purpose": purpose},
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _chat_line(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "fake-chat", "messages": [{"role": "user", "content": text}], **body},
    }


def _create(
    client: TestClient, account: Account, file_id: str, endpoint: str = "/v1/chat/completions"
) -> dict:
    response = client.post(
        "/v1/batches",
        headers=_bearer(account),
        json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"},
    )
    assert response.status_code == 200, response.text
    return response.json()


def _wait(client: TestClient, account: Account, batch_id: str, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.get(f"/v1/batches/{batch_id}", headers=_bearer(account)).json()
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch['status']}"
        time.sleep(0.02)


def _file_lines(client: TestClient, account: Account, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    response = client.get(f"/v1/files/{file_id}/content", headers=_bearer(account))
    assert response.status_code == 200
    return [json.loads(line) for line in response.text.splitlines()]


@pytest.fixture
def rich(gateway: Gateway) -> Account:
    set_model_price(gateway.db, "fake-chat", PRICE.input_micros_per_mtok, PRICE.output_micros_per_mtok)
    return make_account(gateway.db, 10_000_000)


def test_every_line_is_answered_once_at_the_discounted_price(
    billed_client: TestClient, gateway: Gateway, fake_engine: FakeEngine, rich: Account
) -> None:
    lines = [_chat_line(f"req-{i}", f"Question number {i}?", max_tokens=4 + i % 3) for i in range(12)]
    batch = _create(billed_client, rich, _upload(billed_client, rich, lines))
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 12
    done = _wait(billed_client, rich, batch["id"])
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    assert done["error_file_id"] is None
    output = _file_lines(billed_client, rich, done["output_file_id"])
    assert sorted(o["custom_id"] for o in output) == sorted(f"req-{i}" for i in range(12))
    batch_price = discounted(PRICE, 5_000)
    expected = 0
    for item in output:
        assert item["error"] is None and item["response"]["status_code"] == 200
        usage = item["response"]["body"]["usage"]
        expected += cost_micros(usage["prompt_tokens"], usage["completion_tokens"], batch_price)
    assert expected > 0
    assert balance_micros(gateway.db, rich.org.id) == 10_000_000 - expected
    with gateway.db.read() as session:
        assert session.scalar(select(func.count()).where(UsageRecord.org_id == rich.org.id)) == 12
        assert session.scalar(select(func.count()).where(Reservation.state == "open")) == 0
    assert {params.priority for _, params in fake_engine.submitted} == {Priority.BATCH}


def test_bad_lines_get_their_error_and_the_rest_run(
    billed_client: TestClient, gateway: Gateway, rich: Account
) -> None:
    lines = [
        _chat_line("good", "Hello?", max_tokens=3),
        "this is not json",
        {**_chat_line("wrong-url", "Hi"), "url": "/v1/embeddings"},
        _chat_line("no-such-model", "Hi")
        | {"body": {"model": "nope", "messages": [{"role": "user", "content": "Hi"}]}},
        _chat_line("bad-body", "Hi", temperature=7),
        _chat_line("streamed", "Hi", stream=True),
    ]
    done = _wait(billed_client, rich, _create(billed_client, rich, _upload(billed_client, rich, lines))["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 6, "completed": 1, "failed": 5}
    errors = {e["custom_id"]: e for e in _file_lines(billed_client, rich, done["error_file_id"])}
    assert set(errors) == {None, "wrong-url", "no-such-model", "bad-body", "streamed"}
    assert "Line 2" in errors[None]["response"]["body"]["error"]["message"]
    assert errors["no-such-model"]["response"]["status_code"] == 404
    assert errors["bad-body"]["response"]["body"]["error"]["param"] == "temperature"
    assert errors["wrong-url"]["response"]["body"]["error"]["param"] == "url"
    with gateway.db.read() as session:  # only the good line was charged
        assert session.scalar(select(func.count()).where(UsageRecord.org_id == rich.org.id)) == 1


def test_an_invalid_file_fails_the_batch_with_line_numbers(billed_client: TestClient, rich: Account) -> None:
    lines = [_chat_line("same", "a"), _chat_line("other", "b"), _chat_line("same", "c")]
    batch = _create(billed_client, rich, _upload(billed_client, rich, lines))
    assert batch["status"] == "failed"
    assert (
        batch["errors"]["data"][0]["line"] == 3
        and batch["errors"]["data"][0]["code"] == "duplicate_custom_id"
    )
    assert batch["request_counts"]["total"] == 0


def test_another_organizations_file_and_batch_are_not_found(
    billed_client: TestClient, gateway: Gateway, rich: Account
) -> None:
    other = make_account(gateway.db, 1_000_000)
    file_id = _upload(billed_client, rich, [_chat_line("a", "b")])
    refused = billed_client.post(
        "/v1/batches",
        headers=_bearer(other),
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    assert refused.status_code == 404
    batch = _create(billed_client, rich, file_id)
    assert billed_client.get(f"/v1/batches/{batch['id']}", headers=_bearer(other)).status_code == 404
    assert billed_client.post(f"/v1/batches/{batch['id']}/cancel", headers=_bearer(other)).status_code == 404
    listed = billed_client.get("/v1/batches", headers=_bearer(rich)).json()
    assert [b["id"] for b in listed["data"]] == [batch["id"]]


def test_cancel_stops_dispatch_and_keeps_what_was_answered(
    billed_client: TestClient, gateway: Gateway, fake_engine: FakeEngine, rich: Account
) -> None:
    fake_engine.step_delay_s = 0.02  # slow enough that cancelling lands mid-batch
    lines = [_chat_line(f"c-{i}", f"Question {i}?", max_tokens=8) for i in range(60)]
    batch = _create(billed_client, rich, _upload(billed_client, rich, lines))
    deadline = time.monotonic() + 10
    while (
        billed_client.get(f"/v1/batches/{batch['id']}", headers=_bearer(rich)).json()["request_counts"][
            "completed"
        ]
        < 2
    ):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancelling = billed_client.post(f"/v1/batches/{batch['id']}/cancel", headers=_bearer(rich)).json()
    assert cancelling["status"] == "cancelling"
    done = _wait(billed_client, rich, batch["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None
    answered = done["request_counts"]["completed"]
    assert 2 <= answered < 60
    output = _file_lines(billed_client, rich, done["output_file_id"])
    assert len(output) == answered
    with gateway.db.read() as session:  # charged for exactly the lines in the output file
        assert session.scalar(select(func.count()).where(UsageRecord.org_id == rich.org.id)) >= answered
        charged = session.scalar(
            select(func.count()).where(UsageRecord.org_id == rich.org.id, UsageRecord.cost_micros > 0)
        )
    assert charged == answered
    again = billed_client.post(f"/v1/batches/{batch['id']}/cancel", headers=_bearer(rich))
    assert again.status_code == 409


def test_metrics_and_the_admin_api_show_batch_work(
    billed_client: TestClient, gateway: Gateway, rich: Account
) -> None:
    lines = [_chat_line(f"m-{i}", "Hi?", max_tokens=3) for i in range(5)]
    _wait(billed_client, rich, _create(billed_client, rich, _upload(billed_client, rich, lines))["id"])
    metrics = billed_client.get("/metrics").text
    assert 'tokenmill_batch_lines_answered_total{model="fake-chat",outcome="succeeded"} 5.0' in metrics
    assert "tokenmill_batch_queued_lines 0.0" in metrics
    admin_key = (gateway.settings.data_dir / "admin_key").read_text().strip()
    figures = billed_client.get("/v1/admin/batches", headers={"Authorization": f"Bearer {admin_key}"}).json()
    assert figures["queued_lines"] == 0 and figures["lines_per_s"] > 0
    assert [m["model"] for m in figures["models"]] == ["fake-chat"]


def test_the_model_square_shows_batch_prices(billed_client: TestClient, rich: Account) -> None:
    catalog = billed_client.get("/v1/catalog/models", headers=_bearer(rich)).json()
    (model,) = [m for m in catalog["data"] if m["id"] == "fake-chat"]
    assert model["pricing"]["output_micros_per_mtok"] == 6_000_000
    assert model["batch_pricing"]["output_micros_per_mtok"] == 3_000_000
