"""POST /v1/chat/completions against a FakeEngine: the OpenAI wire format and how the request reaches the
engine (chat template, sampling parameters)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.serving.fake_engine import REPLIES, FakeEngine
from tests.serving.sse import stream_events

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]


def _chat(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={"model": "fake-chat", "messages": MESSAGES, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _expected_reply(engine: FakeEngine) -> str:
    prompt_ids, sampling = engine.submitted[-1]
    return engine.tokenizer.decode(engine.reply_for(prompt_ids, sampling), skip_special_tokens=True)


def test_reply_has_openai_shape_and_usage(client: TestClient, fake_engine: FakeEngine) -> None:
    body = _chat(client, temperature=0)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "fake-chat"
    assert "system_fingerprint" in body
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop" and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant"
    assert (
        choice["message"]["content"] == _expected_reply(fake_engine)
        and choice["message"]["content"] in REPLIES
    )
    prompt_ids, _ = fake_engine.submitted[-1]
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["completion_tokens"] == len(fake_engine.reply_for(*fake_engine.submitted[-1]))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_messages_are_rendered_with_the_models_chat_template(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Capital"}, {"type": "text", "text": "of France?"}],
        }
    ]
    client.post("/v1/chat/completions", json={"model": "fake-chat", "messages": parts})
    tok = fake_engine.tokenizer
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "Capital\nof France?"}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids, _ = fake_engine.submitted[-1]
    assert prompt_ids == tok.encode(expected, add_special_tokens=False)
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def test_sampling_fields_reach_the_engine(client: TestClient, fake_engine: FakeEngine) -> None:
    _chat(
        client,
        temperature=0.5,
        top_p=0.9,
        n=1,
        stop=["x", "y"],
        max_completion_tokens=7,
        max_tokens=99,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"42": -100, "7": 5},
        seed=3,
        user="u1",
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.1,
    )
    _, params = fake_engine.submitted[-1]
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.5, 0.9, 20, 0.05)
    assert params.stop == ("x", "y") and params.max_tokens == 7 and params.seed == 3
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.5, 1.1)
    assert params.logit_bias == {42: -100, 7: 5}
    assert params.logprobs is None


def test_default_max_tokens_fills_the_context_window(client: TestClient, fake_engine: FakeEngine) -> None:
    _chat(client)
    prompt_ids, params = fake_engine.submitted[-1]
    assert params.max_tokens == fake_engine.max_model_len - len(prompt_ids)


def test_max_tokens_ends_with_length(client: TestClient) -> None:
    body = _chat(client, max_tokens=3, temperature=0)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_stop_string_is_cut_from_the_text(client: TestClient, fake_engine: FakeEngine) -> None:
    reply = _chat(client, temperature=0)["choices"][0]["message"]["content"]
    word = reply.split()[2]
    body = _chat(client, temperature=0, stop=word)
    assert body["choices"][0]["message"]["content"] == reply[: reply.index(word)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_n_choices_are_indexed_and_all_counted(client: TestClient, fake_engine: FakeEngine) -> None:
    body = _chat(client, n=3, temperature=1.0, seed=0)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) > 1
    prompt_ids, params = fake_engine.submitted[-1]
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)  # once, though three samples share it
    assert body["usage"]["completion_tokens"] == sum(
        len(fake_engine.reply_for(prompt_ids, params, i)) for i in range(3)
    )


def test_logprobs_have_chat_shape(client: TestClient) -> None:
    body = _chat(client, temperature=0, logprobs=True, top_logprobs=2, max_tokens=4)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    assert "".join(e["token"] for e in content) == body["choices"][0]["message"]["content"]


def test_logprobs_true_without_top_logprobs(client: TestClient) -> None:
    content = _chat(client, logprobs=True, max_tokens=2)["choices"][0]["logprobs"]["content"]
    assert [len(e["top_logprobs"]) for e in content] == [0, 0]


# -- streaming -------------------------------------------------------------------------------------


def test_stream_follows_openai_event_order(client: TestClient, fake_engine: FakeEngine) -> None:
    events, done = stream_events(
        client,
        "/v1/chat/completions",
        {"model": "fake-chat", "messages": MESSAGES, "stream": True, "temperature": 0},
    )
    assert done
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert all("usage" not in e for e in events)
    first, *middle, last = events
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert all(set(e["choices"][0]["delta"]) == {"content"} for e in middle)
    assert all(e["choices"][0]["finish_reason"] is None for e in middle)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    text = "".join(e["choices"][0]["delta"]["content"] for e in middle)
    assert text == _expected_reply(fake_engine)


def test_stream_include_usage_adds_a_final_usage_chunk(client: TestClient) -> None:
    events, done = stream_events(
        client,
        "/v1/chat/completions",
        {
            "model": "fake-chat",
            "messages": MESSAGES,
            "stream": True,
            "max_tokens": 5,
            "stream_options": {"include_usage": True},
        },
    )
    assert done
    *chunks, usage_chunk = events
    assert all(chunk["usage"] is None for chunk in chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 5


def test_stream_n2_keeps_choices_apart(client: TestClient) -> None:
    events, _ = stream_events(
        client,
        "/v1/chat/completions",
        {"model": "fake-chat", "messages": MESSAGES, "stream": True, "n": 2, "seed": 1, "logprobs": True},
    )
    texts = {0: "", 1: ""}
    roles = [e["choices"][0]["index"] for e in events if "role" in e["choices"][0]["delta"]]
    assert roles == [0, 1]
    finishes = set()
    for event in events:
        (choice,) = event["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes.add(choice["index"])
        elif "content" in choice["delta"] and choice["delta"]["content"]:
            assert choice["logprobs"]["content"]
    assert finishes == {0, 1}
    assert texts[0] in REPLIES and texts[1] in REPLIES and texts[0] != texts[1]


def test_engine_failure_mid_stream_ends_with_an_error_event(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    fake_engine.fail_with = RuntimeError("gpu on fire: secret detail")
    events, done = stream_events(
        client, "/v1/chat/completions", {"model": "fake-chat", "messages": MESSAGES, "stream": True}
    )
    assert not done
    error = events[-1]["error"]
    assert error["type"] == "server_error" and "secret" not in error["message"]
    assert not fake_engine.running
