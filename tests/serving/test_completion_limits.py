"""How long a completion may be: a request without max_tokens runs with the server's default for the model
(cut to the context window), OpenAI's behaviour stays one setting away, a per-model cap refuses more; and a
request that can never be served (context overflow, a body over the limit) gets its 400/413 before any rate
limit or quota is consulted."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.platform.helpers import Account, make_account
from tests.serving.conftest import wait_ready
from tests.serving.fake_engine import FakeEngine
from tokenmill.platform.gateway import Gateway
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import CompletionLimits, ServerSettings

USER = [{"role": "user", "content": "hi"}]
CONTEXT = 4096


@pytest.fixture
def long_context_engine(smollm2_tokenizer: Any) -> FakeEngine:
    return FakeEngine(smollm2_tokenizer, max_model_len=CONTEXT)


def _client(engine: FakeEngine, settings: ServerSettings, gateway: Gateway | None = None) -> TestClient:
    return TestClient(create_app({"fake-chat": engine}, {}, settings, gateway), raise_server_exceptions=False)


def _asked(engine: FakeEngine) -> int:
    """max_tokens of the last request the engine received."""
    return engine.submitted[-1][1].max_tokens


def _prompt_len(engine: FakeEngine) -> int:
    return len(engine.submitted[-1][0])


@pytest.mark.parametrize(
    ("limits", "chat_expected", "completion_expected"),
    [
        (CompletionLimits(), lambda room: 1024, lambda room: 1024),
        (CompletionLimits(default_max_tokens=64), lambda room: 64, lambda room: 64),
        (CompletionLimits(default_max_tokens=None), lambda room: room, lambda room: 16),  # OpenAI's
        (CompletionLimits(max_completion_tokens=300), lambda room: 300, lambda room: 300),
    ],
    ids=["server-default", "configured", "openai", "capped"],
)
def test_a_request_without_max_tokens_gets_the_servers_default(
    long_context_engine: FakeEngine,
    limits: CompletionLimits,
    chat_expected: Any,
    completion_expected: Any,
) -> None:
    settings = ServerSettings(no_auth=True, completion_limits=limits)
    with _client(long_context_engine, settings) as client:
        wait_ready(client)
        assert (
            client.post("/v1/chat/completions", json={"model": "fake-chat", "messages": USER}).status_code
            == 200
        )
        assert _asked(long_context_engine) == chat_expected(CONTEXT - _prompt_len(long_context_engine))
        assert (
            client.post("/v1/completions", json={"model": "fake-chat", "prompt": "Once"}).status_code == 200
        )
        assert _asked(long_context_engine) == completion_expected(CONTEXT - _prompt_len(long_context_engine))


def test_the_default_is_cut_to_what_the_context_has_left(long_context_engine: FakeEngine) -> None:
    with _client(long_context_engine, ServerSettings(no_auth=True)) as client:
        wait_ready(client)
        long_prompt = "word " * 3500
        response = client.post("/v1/completions", json={"model": "fake-chat", "prompt": long_prompt})
        assert response.status_code == 200
        assert _asked(long_context_engine) == CONTEXT - _prompt_len(long_context_engine) < 1024


def test_more_than_the_models_cap_is_refused_and_other_models_keep_theirs(smollm2_tokenizer: Any) -> None:
    capped, free = FakeEngine(smollm2_tokenizer), FakeEngine(smollm2_tokenizer, model_id="other")
    settings = ServerSettings(no_auth=True, model_completion_limits={"capped": CompletionLimits(None, 100)})
    app = create_app({"capped": capped, "other": free}, {}, settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        body = {"messages": USER, "max_tokens": 101}
        refused = client.post("/v1/chat/completions", json={**body, "model": "capped"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
        assert "at most 100 tokens" in refused.json()["error"]["message"]
        completion_cap = client.post(
            "/v1/chat/completions", json={"model": "capped", "messages": USER, "max_completion_tokens": 101}
        )
        assert completion_cap.json()["error"]["param"] == "max_completion_tokens"
        assert capped.submitted == []
        assert client.post("/v1/chat/completions", json={**body, "model": "other"}).status_code == 200


# -- validation before limits ----------------------------------------------------------------------


@pytest.fixture
def limited(long_context_engine: FakeEngine, gateway: Gateway) -> Iterator[tuple[TestClient, Account]]:
    """A key that has used its one request of this minute, behind the default 8 MiB body limit."""
    gateway.register_models(["fake-chat"])
    account = make_account(gateway.db, requests_per_minute=1)
    with _client(long_context_engine, ServerSettings(), gateway) as client:
        wait_ready(client)
        headers = {"Authorization": f"Bearer {account.key.key}"}
        first = client.post(
            "/v1/chat/completions",
            json={"model": "fake-chat", "messages": USER, "max_tokens": 4},
            headers=headers,
        )
        assert first.status_code == 200
        client.headers.update(headers)
        yield client, account


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_a_request_that_can_never_run_is_a_400_not_a_429(limited: tuple[TestClient, Account]) -> None:
    client, _ = limited
    too_long = {"model": "fake-chat", "messages": USER, "max_tokens": 100_000}
    error = _error(client.post("/v1/chat/completions", json=too_long), 400)
    assert error["code"] == "context_length_exceeded" and "4096" in error["message"]
    huge_prompt = {"model": "fake-chat", "messages": [{"role": "user", "content": "word " * 400_000}]}  # 2 MB
    error = _error(client.post("/v1/chat/completions", json=huge_prompt), 400)
    assert error["code"] == "context_length_exceeded"
    prompts = {"model": "fake-chat", "prompt": ["fine", "word " * 5000], "max_tokens": 4}
    assert _error(client.post("/v1/completions", json=prompts), 400)["code"] == "context_length_exceeded"
    # A servable request is refused by the rate limit, as it should be, and may retry later.
    refused = client.post(
        "/v1/chat/completions", json={"model": "fake-chat", "messages": USER, "max_tokens": 4}
    )
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1


def test_a_body_over_the_limit_is_a_413_before_anything_else(limited: tuple[TestClient, Account]) -> None:
    client, _ = limited
    content = "x" * (9 * 2**20)
    response = client.post(
        "/v1/chat/completions",
        json={"model": "fake-chat", "messages": [{"role": "user", "content": content}]},
    )
    assert _error(response, 413)["code"] == "request_too_large"


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="default_max_tokens"):
        CompletionLimits(default_max_tokens=0)
    assert (
        replace(ServerSettings(), model_completion_limits={"m": CompletionLimits(5)})
        .limits_for("m")
        .default_max_tokens
        == 5
    )
