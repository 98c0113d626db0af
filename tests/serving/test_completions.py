"""POST /v1/completions against a FakeEngine: the four prompt forms, echo, legacy logprobs, streaming."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.serving.fake_engine import FakeEngine
from tests.serving.sse import stream_events


def _complete(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/completions", json={"model": "fake-chat", **body})
    assert response.status_code == 200, response.text
    return response.json()


def _reply(engine: FakeEngine, prompt_ids: list[int], max_tokens: int = 16) -> str:
    ids = engine.reply_for(prompt_ids, engine.submitted[-1][1])[:max_tokens]
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_string_prompt(client: TestClient, fake_engine: FakeEngine) -> None:
    body = _complete(client, prompt="Once upon a time", temperature=0)
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    (choice,) = body["choices"]
    prompt_ids = fake_engine.tokenizer("Once upon a time").input_ids
    assert fake_engine.submitted[-1][0] == prompt_ids
    assert choice["text"] == _reply(fake_engine, prompt_ids) and choice["index"] == 0
    # No max_tokens: the server's default (1,024), cut to what the fake engine's 1,024-token context has left.
    assert fake_engine.submitted[-1][1].max_tokens == 1024 - len(prompt_ids)
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)


def test_prompt_forms_and_choice_order(client: TestClient, fake_engine: FakeEngine) -> None:
    ids = fake_engine.tokenizer("Hello there").input_ids
    assert len(_complete(client, prompt=ids)["choices"]) == 1
    assert fake_engine.submitted[-1][0] == ids
    body = _complete(client, prompt=[ids, ids[:1]], n=2, max_tokens=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    body = _complete(client, prompt=["a b c", "d e f g h"], max_tokens=2, temperature=0)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    tok = fake_engine.tokenizer
    assert body["usage"]["prompt_tokens"] == len(tok("a b c").input_ids) + len(tok("d e f g h").input_ids)
    assert body["usage"]["completion_tokens"] == 4


def test_echo_prepends_the_prompt(client: TestClient) -> None:
    body = _complete(client, prompt="Say hi:", echo=True, max_tokens=3, temperature=0)
    plain = _complete(client, prompt="Say hi:", max_tokens=3, temperature=0)
    assert body["choices"][0]["text"] == "Say hi:" + plain["choices"][0]["text"]


def test_legacy_logprobs_shape(client: TestClient) -> None:
    body = _complete(client, prompt="Tell me", logprobs=2, max_tokens=5, temperature=0)
    logprobs = body["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 5
    assert "".join(logprobs["tokens"]) == body["choices"][0]["text"]
    offsets = logprobs["text_offset"]
    assert offsets == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(5)]
    pairs = zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True)
    assert all(token in top and len(top) <= 3 for token, top in pairs)


def test_stream(client: TestClient) -> None:
    plain = _complete(client, prompt=["One", "Two"], max_tokens=6, temperature=0)
    events, done = stream_events(
        client,
        "/v1/completions",
        {
            "model": "fake-chat",
            "prompt": ["One", "Two"],
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
            "logprobs": 1,
            "stream_options": {"include_usage": True},
        },
    )
    assert done
    *chunks, usage_chunk = events
    texts = {0: "", 1: ""}
    offsets: dict[int, list[int]] = {0: [], 1: []}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        assert chunk["object"] == "text_completion" and chunk["usage"] is None
        texts[choice["index"]] += choice["text"]
        if choice["logprobs"]:
            offsets[choice["index"]] += choice["logprobs"]["text_offset"]
    assert [texts[0], texts[1]] == [c["text"] for c in plain["choices"]]
    assert offsets[0][0] == 0 and offsets[0] == sorted(offsets[0])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == ["length", "length"]


def test_stream_echo_sends_the_prompt_first(client: TestClient) -> None:
    events, _ = stream_events(
        client,
        "/v1/completions",
        {"model": "fake-chat", "prompt": "Echo me", "echo": True, "max_tokens": 2, "stream": True},
    )
    assert events[0]["choices"][0]["text"] == "Echo me"
