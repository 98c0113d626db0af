"""Every error reaches the client in OpenAI's shape with the right status, names the offending field, and
never leaks FastAPI's 422 shape or a stack trace; every response carries x-request-id."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.serving.fake_engine import FakeEngine
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

USER = [{"role": "user", "content": "hi"}]


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and "detail" not in body
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fake-chat"}, "messages"),
        ({"model": "fake-chat", "messages": []}, "messages"),
        ({"messages": USER}, "model"),
        ({"model": "fake-chat", "messages": USER, "temperature": 2.5}, "temperature"),
        ({"model": "fake-chat", "messages": USER, "temperature": "hot"}, "temperature"),
        ({"model": "fake-chat", "messages": USER, "top_p": 1.5}, "top_p"),
        ({"model": "fake-chat", "messages": USER, "n": 0}, "n"),
        ({"model": "fake-chat", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": "fake-chat", "messages": USER, "max_completion_tokens": -1}, "max_completion_tokens"),
        ({"model": "fake-chat", "messages": USER, "presence_penalty": 3}, "presence_penalty"),
        ({"model": "fake-chat", "messages": USER, "frequency_penalty": -3}, "frequency_penalty"),
        ({"model": "fake-chat", "messages": USER, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"model": "fake-chat", "messages": USER, "top_logprobs": 2}, "top_logprobs"),
        ({"model": "fake-chat", "messages": USER, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"model": "fake-chat", "messages": USER, "logit_bias": {"5": 500}}, "logit_bias.5"),
        ({"model": "fake-chat", "messages": USER, "stop": [""]}, "stop"),
        ({"model": "fake-chat", "messages": USER, "top_k": -5}, "top_k"),
        ({"model": "fake-chat", "messages": USER, "min_p": 2}, "min_p"),
        ({"model": "fake-chat", "messages": USER, "repetition_penalty": 0}, "repetition_penalty"),
        ({"model": "fake-chat", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "fake-chat", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {
                "model": "fake-chat",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            },
            "messages[0].content[0].type",
        ),
        (
            {"model": "fake-chat", "messages": [{"role": "function", "content": "x", "name": "f"}]},
            "messages[0].role",
        ),
        ({"model": "fake-chat", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"model": "fake-chat", "messages": USER, "functions": [{"name": "f"}]}, "functions"),
        (
            {
                "model": "fake-chat",
                "messages": USER,
                "tools": [{"type": "function", "function": {"name": "a b"}}],
            },
            "tools[0].function.name",
        ),
        (
            {
                "model": "fake-chat",
                "messages": USER,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"model": "fake-chat", "messages": USER, "tool_choice": "required"}, "tool_choice"),
        (
            {
                "model": "fake-chat",
                "messages": USER,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
        (
            {"model": "fake-chat", "messages": USER, "response_format": {"type": "xml"}},
            "response_format",
        ),
        (
            {"model": "fake-chat", "messages": USER, "guided_regex": "[0-9]+", "guided_choice": ["a", "b"]},
            "guided_choice",
        ),
        (
            {"model": "fake-chat", "messages": USER, "guided_json": "{not json"},
            "guided_json",
        ),
        (
            {"model": "fake-chat", "messages": USER, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
    ],
)
def test_invalid_chat_fields_are_400_naming_the_param(client: TestClient, body: dict, param: str) -> None:
    error = _error(client.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fake-chat", "prompt": "x", "suffix": "tail"}, "suffix"),
        ({"model": "fake-chat", "prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ({"model": "fake-chat", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "fake-chat", "prompt": ""}, "prompt"),
        ({"model": "fake-chat", "prompt": []}, "prompt"),
        ({"model": "fake-chat", "prompt": {"a": 1}}, "prompt"),
        ({"model": "fake-chat", "prompt": "x", "logprobs": 50}, "logprobs"),
    ],
)
def test_invalid_completion_fields_are_400(client: TestClient, body: dict, param: str) -> None:
    assert _error(client.post("/v1/completions", json=body), 400)["param"] == param


def test_context_length_exceeded(client: TestClient, fake_engine: FakeEngine) -> None:
    body = {"model": "fake-chat", "messages": USER, "max_tokens": fake_engine.max_model_len}
    error = _error(client.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    stream = _error(client.post("/v1/chat/completions", json={**body, "stream": True}), 400)
    assert stream["code"] == "context_length_exceeded"  # a 400, not an error event inside a 200 stream
    assert not fake_engine.running


def test_unknown_model_is_404(client: TestClient) -> None:
    for path, body in [
        ("/v1/chat/completions", {"messages": USER}),
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/embeddings", {"input": "x"}),
    ]:
        error = _error(client.post(path, json={"model": "gpt-17", **body}), 404)
        assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert _error(client.get("/v1/models/gpt-17"), 404)["code"] == "model_not_found"


def test_malformed_bodies_are_400_not_422(client: TestClient) -> None:
    raw = [b"{not json", b"", b"[1, 2]", b"null", b'"text"']
    for content in raw:
        response = client.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
        assert _error(response, 400)["type"] == "invalid_request_error"


def test_unknown_urls_and_methods(client: TestClient) -> None:
    assert _error(client.get("/v1/nothing-here"), 404)["code"] == "unknown_url"
    assert _error(client.get("/v1/chat/completions"), 405)["type"] == "invalid_request_error"


def test_body_over_the_limit_is_413(client: TestClient, settings: ServerSettings) -> None:
    big = {"model": "fake-chat", "messages": [{"role": "user", "content": "x" * settings.max_body_bytes}]}
    error = _error(client.post("/v1/chat/completions", json=big), 413)
    assert error["code"] == "request_too_large"

    def chunks() -> Any:  # no content-length: the limit must hold while reading
        for _ in range(settings.max_body_bytes // 1024 + 2):
            yield b" " * 1024

    response = client.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert _error(response, 413)["code"] == "request_too_large"


def test_unexpected_exception_is_500_without_trace(
    client: TestClient, fake_engine: FakeEngine, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    def explode(*_: Any) -> Any:
        raise RuntimeError("secret database password in message")

    monkeypatch.setattr(fake_engine, "generate", explode)
    with caplog.at_level(logging.ERROR):
        response = client.post("/v1/chat/completions", json={"model": "fake-chat", "messages": USER})
    error = _error(response, 500)
    request_id = response.headers["x-request-id"]
    assert error["type"] == "server_error" and request_id in error["message"]
    assert "secret" not in response.text
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the trace is in the server log


def test_request_id_header(client: TestClient) -> None:
    first, second = client.get("/health"), client.get("/health")
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert client.get("/health", headers={"x-request-id": "trace-123"}).headers["x-request-id"] == "trace-123"
    evil = client.get("/health", headers={"x-request-id": "a b\tc"}).headers["x-request-id"]
    assert evil.startswith("req_")


def test_model_without_chat_template(fake_engine: FakeEngine) -> None:
    tokenizer = copy.deepcopy(fake_engine.tokenizer)
    tokenizer.chat_template = None
    engine = FakeEngine(tokenizer, model_id="base")
    with TestClient(create_app({"base": engine}, {}, ServerSettings(no_auth=True))) as client:
        from tests.serving.conftest import wait_ready

        wait_ready(client)
        error = _error(client.post("/v1/chat/completions", json={"model": "base", "messages": USER}), 400)
        assert error["code"] == "chat_template_missing" and "/v1/completions" in error["message"]
        assert client.post("/v1/completions", json={"model": "base", "prompt": "hi"}).status_code == 200
