"""The streaming client against canned SSE responses (httpx.MockTransport): what it counts as tokens, what it
takes from `usage`, what it sends, and how each kind of failure becomes an error type."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from tokenmill.bench.client import Target, first_model, send
from tokenmill.bench.workload import BenchRequest

REQUEST = BenchRequest(({"role": "user", "content": "Hi"},), "Hi", max_tokens=3)
USAGE = {
    "prompt_tokens": 9,
    "completion_tokens": 3,
    "total_tokens": 12,
    "prompt_tokens_details": {"cached_tokens": 8},
}


def sse(*payloads: dict[str, Any] | str, done: bool = True) -> bytes:
    events = [f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n" for p in payloads]
    return ("".join(events) + ("data: [DONE]\n\n" if done else "")).encode()


def chat_chunk(content: str | None, role: str | None = None) -> dict[str, Any]:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


def replay(response: httpx.Response) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _: response


def client_for(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_chat_stream_counts_text_chunks_and_reads_usage() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = sse(
            chat_chunk("", role="assistant"),  # the role chunk carries no token
            chat_chunk("Hel"),
            chat_chunk("lo"),
            chat_chunk("!"),
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
            {"choices": [], "usage": USAGE},
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    target = Target("http://127.0.0.1:9/v1", "m", api_key="sk-test", extra_body={"logit_bias": {"2": -100}})
    async with client_for(handler) as client:
        record = await send(client, target, REQUEST, start=0.0)
    assert record.ok and record.streamed_tokens == 3
    assert (record.prompt_tokens, record.output_tokens, record.cached_tokens) == (9, 3, 8)
    assert record.send_s <= record.chunk_times_s[0] <= record.chunk_times_s[-1] <= record.end_s
    (request,) = seen
    assert str(request.url) == "http://127.0.0.1:9/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert json.loads(request.content) == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "temperature": 0.0,
        "logit_bias": {"2": -100},
    }


async def test_completions_stream() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions" and json.loads(request.content)["prompt"] == "Hi"
        assert "authorization" not in request.headers
        chunks = [{"choices": [{"index": 0, "text": t}]} for t in ("a", "b")]
        return httpx.Response(200, content=sse(*chunks, {"choices": [], "usage": USAGE}))

    async with client_for(handler) as client:
        record = await send(client, Target("http://127.0.0.1:9/v1/", "m", "completions"), REQUEST, 0.0)
    assert record.ok and record.streamed_tokens == 2 and record.output_tokens == 3


async def test_failures_become_error_types() -> None:
    responses = {
        "http": httpx.Response(429, json={"error": {"message": "slow down"}}),
        "event": httpx.Response(200, content=sse(chat_chunk("a"), {"error": {"code": "request_aborted"}})),
        "cut": httpx.Response(200, content=sse(chat_chunk("a"), done=False)),
        "garbage": httpx.Response(200, content=b"data: {oops\n\n"),
    }
    errors = {}
    for name, response in responses.items():
        async with client_for(replay(response)) as client:
            record = await send(client, Target("http://127.0.0.1:9/v1", "m"), REQUEST, 0.0)
        errors[name] = record.error
        assert record.end_s >= record.send_s
    assert errors == {
        "http": "HTTP 429",
        "event": "stream error: request_aborted",
        "cut": "incomplete stream",
        "garbage": "invalid SSE payload",
    }

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with client_for(refuse) as client:
        record = await send(client, Target("http://127.0.0.1:9/v1", "m"), REQUEST, 0.0)
    assert record.error == "ConnectError" and "refused" in record.error_detail


async def test_first_model() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        return httpx.Response(
            200, json={"object": "list", "data": [{"id": "minilm", "type": "embedding"}, {"id": "smollm2"}]}
        )

    async with client_for(handler) as client:
        assert await first_model(client, "http://127.0.0.1:9/v1", None) == "smollm2"
