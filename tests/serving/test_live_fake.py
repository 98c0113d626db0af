"""A real uvicorn server (in a thread) over the FakeEngine: real sockets, so client disconnects are real; and
the official openai SDK, sync and async, parsing every response shape."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import httpx
import numpy as np
import openai
import pytest

from tests.serving.fake_engine import REPLIES, FakeEngine

USER = [{"role": "user", "content": "Tell me something."}]


def _poll(condition: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until `condition` held; fails after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - start


def _kv_usage(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('tokenmill_kv_cache_usage_ratio{model="fake-chat"}'):
            return float(line.split()[-1])
    raise AssertionError("no kv usage metric")


def test_closing_a_stream_aborts_the_engine_request(live_fake: tuple[str, FakeEngine]) -> None:
    url, engine = live_fake
    engine.endless, engine.step_delay_s = True, 0.02
    body = {"model": "fake-chat", "messages": USER, "stream": True, "max_tokens": 900}
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        _poll(lambda: engine.running and _kv_usage(url) > 0, 5)
    _poll(lambda: not engine.running, 1.0)
    assert _kv_usage(url) == 0
    assert len(engine.submitted) == 1


def test_cancelled_non_streaming_request_is_aborted(live_fake: tuple[str, FakeEngine]) -> None:
    url, engine = live_fake
    engine.endless, engine.step_delay_s = True, 0.02
    body = {"model": "fake-chat", "messages": USER, "max_tokens": 900}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
    _poll(lambda: not engine.running, 1.0)  # 900 tokens take 18 s: only the cancel ends it this soon
    assert len(engine.submitted) == 1


def test_openai_sdk_sync(live_fake: tuple[str, FakeEngine]) -> None:
    url, _ = live_fake
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="fake-chat", messages=USER, temperature=0, n=2, logprobs=True, top_logprobs=1
    )
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content in REPLIES
    assert chat.choices[0].logprobs.content[0].top_logprobs[0].token
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    stream = client.chat.completions.create(
        model="fake-chat", messages=USER, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == chat.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens // 2

    completion = client.completions.create(
        model="fake-chat", prompt=["a", "b"], max_tokens=4, logprobs=1, temperature=0
    )
    assert len(completion.choices) == 2 and len(completion.choices[1].logprobs.tokens) == 4
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="fake-chat", prompt="a", max_tokens=4, stream=True, temperature=0
        )
    )
    assert text == completion.choices[0].text

    models = {m.id for m in client.models.list()}
    assert models == {"fake-chat", "all-MiniLM-L6-v2"}
    assert client.models.retrieve("fake-chat").owned_by == "tokenmill"


def test_openai_sdk_embeddings(live_fake: tuple[str, FakeEngine]) -> None:
    url, _ = live_fake
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    default = client.embeddings.create(model="all-MiniLM-L6-v2", input=["hi there", "bye"])  # SDK asks base64
    floats = client.embeddings.create(
        model="all-MiniLM-L6-v2", input=["hi there", "bye"], encoding_format="float"
    )
    raw = client.embeddings.create(model="all-MiniLM-L6-v2", input="hi there", encoding_format="base64")
    assert np.allclose(default.data[0].embedding, floats.data[0].embedding, atol=0)
    decoded = np.frombuffer(base64.b64decode(raw.data[0].embedding), dtype="<f4")
    assert np.array_equal(decoded, np.asarray(floats.data[0].embedding, dtype=np.float32))
    assert floats.usage.prompt_tokens > 0


def test_openai_sdk_errors(live_fake: tuple[str, FakeEngine]) -> None:
    url, engine = live_fake
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=USER)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="fake-chat", messages=USER, temperature=9)
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="fake-chat", messages=USER, max_tokens=engine.max_model_len)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as dims:
        client.embeddings.create(model="all-MiniLM-L6-v2", input="x", dimensions=64)
    assert dims.value.param == "dimensions"
    engine.fail_with = RuntimeError("boom")
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="fake-chat", messages=USER, stream=True):
            pass


async def test_openai_sdk_async(live_fake: tuple[str, FakeEngine]) -> None:
    url, _ = live_fake
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    chat = await client.chat.completions.create(model="fake-chat", messages=USER, temperature=0)
    stream = await client.chat.completions.create(
        model="fake-chat", messages=USER, temperature=0, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == chat.choices[0].message.content
    embeddings = await client.embeddings.create(model="all-MiniLM-L6-v2", input="hello")
    assert len(embeddings.data[0].embedding) == 384
    await client.close()
