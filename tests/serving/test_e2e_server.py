"""End to end: a real `tokenmill serve` process (a tiny random-weight Llama with the real SmolLM2 tokenizer,
and the real all-MiniLM-L6-v2) driven over HTTP by the official openai SDK, sync and async, and by
langchain-openai. The default `tokenmill serve` (real SmolLM2) has its own tests in test_e2e_smollm2.py."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.serving.server_process import ServerProcess

pytest.importorskip("tokenmill.engine.async_engine")
pytestmark = pytest.mark.slow  # runs a server process

MODEL, EMBEDDING_MODEL = "tiny", "all-MiniLM-L6-v2"
USER = [{"role": "user", "content": "Tell me about the sea."}]
NO_EOS = {"logit_bias": {"2": -100}}  # random weights: keep EOS from ending a test's generation early
MAX_BODY_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [
        "--model",
        f"{MODEL}={tiny_llama_dir}",
        "--embedding-model",
        EMBEDDING_MODEL,
        "--max-body-bytes",
        str(MAX_BODY_BYTES),
        "--kv-cache-memory",
        "64M",
        "--max-num-seqs",
        "64",
        "--target-tpot-ms",
        "30",
        "--no-auth",  # the OpenAI surface; keys and billing over a real server are in tests/e2e
    ]
    process = ServerProcess(args, tmp_path_factory.mktemp("serve") / "serve.log").start(timeout_s=180)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0)


@pytest.fixture
def aclient(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def _poll(condition: Callable[[], bool], timeout_s: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not reached within {timeout_s}s"
        time.sleep(0.02)
    return time.monotonic() - start


def test_chat_streaming_and_not(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=12, **NO_EOS)
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion" and chat.model == MODEL
    (choice,) = chat.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length" and choice.message.content
    assert chat.usage.completion_tokens == 12
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, max_tokens=12, stream=True, **NO_EOS
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content


def test_completions(client: openai.OpenAI) -> None:
    tokens = client.completions.create(
        model=MODEL, prompt=[1, 504, 3575], max_tokens=5, temperature=0, **NO_EOS
    )
    assert tokens.object == "text_completion" and tokens.usage.prompt_tokens == 3
    batch = client.completions.create(
        model=MODEL, prompt=["The sea is", "Mountains are"], max_tokens=5, temperature=0, n=2, **NO_EOS
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: both samples agree
    echo = client.completions.create(
        model=MODEL, prompt="The sea is", max_tokens=5, temperature=0, echo=True, **NO_EOS
    )
    assert echo.choices[0].text == "The sea is" + batch.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The sea is", max_tokens=5, temperature=0, stream=True, **NO_EOS
        )
    )
    assert streamed == batch.choices[0].text


def test_n2_and_stop(client: openai.OpenAI) -> None:
    sampled = client.chat.completions.create(
        model=MODEL, messages=USER, n=2, temperature=1.0, seed=7, max_tokens=8, **NO_EOS
    )
    assert [c.index for c in sampled.choices] == [0, 1] and sampled.usage.completion_tokens == 16
    text = (
        client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=24, **NO_EOS)
        .choices[0]
        .message.content
    )
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, max_tokens=24, stop=[stop], **NO_EOS
    ).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content == text[: text.index(stop)]


def test_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, **NO_EOS
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    legacy = (
        client.completions.create(
            model=MODEL, prompt="The sea is", max_tokens=4, temperature=0, logprobs=2, **NO_EOS
        )
        .choices[0]
        .logprobs
    )
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.text_offset) == 4


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return (
            client.chat.completions.create(
                model=MODEL, messages=USER, temperature=1.5, seed=seed, max_tokens=16, **NO_EOS
            )
            .choices[0]
            .message.content
        )

    assert sample(42) == sample(42)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_include_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            **NO_EOS,
        )
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    prompt_tokens = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=1
    ).usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_embeddings(client: openai.OpenAI) -> None:
    texts = ["A man is playing a guitar.", "Someone strums a guitar.", "The stock market fell sharply today."]
    floats = client.embeddings.create(model=EMBEDDING_MODEL, input=texts, encoding_format="float")
    encoded = client.embeddings.create(model=EMBEDDING_MODEL, input=texts, encoding_format="base64")
    vectors = np.asarray([d.embedding for d in floats.data], dtype=np.float32)
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in encoded.data])
    np.testing.assert_array_equal(vectors, decoded)
    assert vectors.shape == (3, 384) and floats.usage.prompt_tokens > 0
    query, paraphrase, unrelated = vectors
    assert query @ paraphrase > query @ unrelated


def test_model_listing(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list()} == {MODEL, EMBEDDING_MODEL}
    assert client.models.retrieve(MODEL).id == MODEL


def test_errors(client: openai.OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=USER, top_p=7)
    assert bad.value.param == "top_p"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="hello", max_tokens=100_000)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as dims:
        client.embeddings.create(model=EMBEDDING_MODEL, input="x", dimensions=8)
    assert dims.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError) as suffix:
        client.completions.create(model=MODEL, prompt="x", suffix="y")
    assert suffix.value.param == "suffix"
    with pytest.raises(openai.APIStatusError) as too_big:
        client.completions.create(model=MODEL, prompt="x" * MAX_BODY_BYTES)
    assert too_big.value.status_code == 413
    raw = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert raw.headers["x-request-id"]


def test_langchain_streams_a_reply(server: ServerProcess) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{server.url}/v1",
        api_key="not-needed",
        temperature=0,
        max_tokens=8,
        max_retries=0,
    )
    pieces = [chunk.content for chunk in llm.stream("Say something.")]
    assert len(pieces) >= 2 and "".join(pieces)


def test_closing_a_stream_frees_its_kv_blocks(server: ServerProcess) -> None:
    assert server.metric("tokenmill_kv_cache_usage_ratio", MODEL) == 0
    body = {"model": MODEL, "messages": USER, "max_tokens": 400, "stream": True, **NO_EOS}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.metric("tokenmill_num_running_seqs", MODEL) == 1
        assert server.metric("tokenmill_kv_cache_usage_ratio", MODEL) > 0
    freed_after_s = _poll(lambda: server.metric("tokenmill_kv_cache_usage_ratio", MODEL) == 0, timeout_s=1.0)
    assert server.metric("tokenmill_num_running_seqs", MODEL) == 0, freed_after_s


def test_metrics_show_the_step_time_policy(server: ServerProcess) -> None:
    assert server.metric("tokenmill_target_tpot_seconds", MODEL) == 0.03
    exposition = httpx.get(f"{server.url}/metrics").text
    assert "# TYPE tokenmill_tpot_limited_steps_total counter" in exposition  # how often it acted, per model
    server.metric("tokenmill_tpot_limited_steps_total", MODEL)


def test_cancelled_request_frees_its_kv_blocks(server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 450, **NO_EOS}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=0.3)
    _poll(lambda: server.metric("tokenmill_num_running_seqs", MODEL) == 0, timeout_s=1.0)
    assert server.metric("tokenmill_kv_cache_usage_ratio", MODEL) == 0


def test_64_concurrent_streams_match_one_by_one(client: openai.OpenAI, aclient: openai.AsyncOpenAI) -> None:
    prompts = [
        [{"role": "user", "content": f"Request {i}: describe the number {i * 37 % 101}."}] for i in range(64)
    ]
    alone = [
        client.chat.completions.create(model=MODEL, messages=p, temperature=0, max_tokens=16, **NO_EOS)
        .choices[0]
        .message.content
        for p in prompts
    ]

    async def stream(messages: list[dict[str, str]]) -> tuple[set[str], str]:
        response = await aclient.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=16, stream=True, **NO_EOS
        )
        ids, text = set(), ""
        async for chunk in response:
            ids.add(chunk.id)
            assert [c.index for c in chunk.choices] == [0]
            text += chunk.choices[0].delta.content or ""
        return ids, text

    async def all_at_once() -> list[tuple[set[str], str]]:
        results = await asyncio.gather(*(stream(p) for p in prompts))
        await aclient.close()
        return results

    together = asyncio.run(all_at_once())
    assert all(len(ids) == 1 for ids, _ in together)
    assert len({next(iter(ids)) for ids, _ in together}) == 64
    assert [text for _, text in together] == alone
