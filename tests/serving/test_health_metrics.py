"""Probes, model listing and Prometheus metrics."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from tests.serving.conftest import wait_ready
from tests.serving.fake_engine import FakeEngine
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

USER = [{"role": "user", "content": "hi"}]


def test_ready_is_503_until_the_engines_have_started(fake_engine: FakeEngine) -> None:
    fake_engine.start_gate = threading.Event()
    with TestClient(create_app({"fake-chat": fake_engine}, {}, ServerSettings(no_auth=True))) as client:
        assert client.get("/health").json() == {"status": "ok"}
        loading = client.get("/ready")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        response = client.post("/v1/chat/completions", json={"model": "fake-chat", "messages": USER})
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_ready"
        fake_engine.start_gate.set()
        wait_ready(client)
        assert client.get("/ready").json() == {"status": "ready", "models": ["fake-chat"], "error": None}
    assert not fake_engine.started  # the lifespan shut it down


def test_failed_start_is_reported_by_ready(fake_engine: FakeEngine) -> None:
    async def broken_start() -> None:
        raise OSError("weights missing")

    fake_engine.start = broken_start  # type: ignore[method-assign]
    with TestClient(create_app({"fake-chat": fake_engine}, {}, ServerSettings(no_auth=True))) as client:
        deadline = time.monotonic() + 5
        while client.get("/ready").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        body = client.get("/ready").json()
        assert body["status"] == "failed" and "weights missing" in body["error"]


def test_a_model_that_fails_to_load_is_reported_and_the_others_serve(
    fake_engine: FakeEngine, smollm2_tokenizer: object
) -> None:
    broken = FakeEngine(smollm2_tokenizer, model_id="broken")

    async def broken_start() -> None:
        raise OSError("weights missing")

    broken.start = broken_start  # type: ignore[method-assign]
    app = create_app({"fake-chat": fake_engine, "broken": broken}, {}, ServerSettings(no_auth=True))
    with TestClient(app) as client:
        wait_ready(client)
        body = client.get("/ready").json()
        assert body["status"] == "ready" and body["error"] == "broken: OSError: weights missing"
        failed = client.post("/v1/chat/completions", json={"model": "broken", "messages": USER})
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "model_unavailable"
        assert "weights missing" in failed.json()["error"]["message"]
        served = client.post("/v1/chat/completions", json={"model": "fake-chat", "messages": USER})
        assert served.status_code == 200


def test_models_list_and_retrieve(client: TestClient, fake_engine: FakeEngine) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "fake-chat" and card["object"] == "model" and card["owned_by"] == "tokenmill"
    assert isinstance(card["created"], int) and card["max_model_len"] == fake_engine.max_model_len
    assert client.get("/v1/models/fake-chat").json() == card


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{wanted}}} not in metrics")


def test_metrics(client: TestClient, fake_engine: FakeEngine) -> None:
    body = client.post(
        "/v1/chat/completions", json={"model": "fake-chat", "messages": USER, "max_tokens": 5}
    ).json()
    client.post("/v1/chat/completions", json={"model": "fake-chat", "messages": USER, "n": 0})
    text = client.get("/metrics").text
    assert _metric(text, "tokenmill_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert _metric(text, "tokenmill_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert _metric(text, "tokenmill_prompt_tokens_total", model="fake-chat") == body["usage"]["prompt_tokens"]
    assert _metric(text, "tokenmill_generation_tokens_total", model="fake-chat") == 5
    assert _metric(text, "tokenmill_time_to_first_token_seconds_count", model="fake-chat") == 1
    assert _metric(text, "tokenmill_inter_token_latency_seconds_count", model="fake-chat") >= 1
    assert _metric(text, "tokenmill_kv_cache_total_blocks", model="fake-chat") == fake_engine.num_blocks
    assert _metric(text, "tokenmill_kv_cache_usage_ratio", model="fake-chat") == 0
    assert _metric(text, "tokenmill_num_running_seqs", model="fake-chat") == 0
    assert _metric(text, "tokenmill_num_waiting_seqs", model="fake-chat") == 0
    client.get("/v1/nope")
    assert 'endpoint="unmatched"' in client.get("/metrics").text


def test_two_apps_do_not_share_metrics(fake_engine: FakeEngine) -> None:
    other = create_app({"fake-chat": fake_engine}, {}, ServerSettings(no_auth=True))
    first = create_app({"fake-chat": fake_engine}, {}, ServerSettings(no_auth=True))
    with TestClient(first) as client:
        wait_ready(client)
        client.get("/health")
    with TestClient(other) as client:
        client.get("/metrics")
        text = client.get("/metrics").text
    assert _metric(text, "tokenmill_requests_total", endpoint="/metrics", status="200") == 1
    assert 'endpoint="/health"' not in text
