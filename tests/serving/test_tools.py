"""Tool calling over a real `tokenmill serve` with a tiny random-weight model, where nothing but the grammar
can make a call valid: through the official openai SDK, every call of a "required", named or single call
answer goes to a declared function with arguments that validate against its schema; streamed deltas
reassemble to the same calls as the whole answer; a history of calls and results is answered; bad tool
fields are a 400 naming the field. How tools are rendered is tests/serving/test_tool_rendering.py."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.serving.server_process import ServerProcess

pytestmark = pytest.mark.slow  # runs a server process

MODEL = "tiny"
USER = [{"role": "user", "content": "Book a table for four at seven, then check the weather in Oslo."}]
PARAMETERS: dict[str, dict[str, Any]] = {  # two objects left open, as LangChain's schemas are
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 12},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "book_table": {
        "type": "object",
        "properties": {
            "guests": {"type": "integer", "minimum": 1, "maximum": 12},
            "time": {
                "type": "object",
                "properties": {
                    "hour": {"type": "integer", "minimum": 17, "maximum": 22},
                    "minute": {"enum": [0, 15, 30, 45]},
                },
                "required": ["hour", "minute"],
            },
            "vegetarian": {"type": "boolean"},
        },
        "required": ["guests", "time"],
        "additionalProperties": False,
    },
    "search": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 10},
            "limit": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["query"],
    },
}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"The {name} tool.", "parameters": schema}}
    for name, schema in PARAMETERS.items()
]


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # The tools' prompt takes ~450 of the tiny model's 512 positions: give the random weights a longer window
    # (rotary positions have no trained range to leave).
    model_dir = tmp_path_factory.mktemp("tiny-long") / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    args = ["--model", f"{MODEL}={model_dir}", "--embedding-model", "none", "--kv-cache-memory", "64M"]
    process = ServerProcess([*args, "--no-auth"], tmp_path_factory.mktemp("serve") / "serve.log")
    yield process.start(timeout_s=180)
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=300)


def _calls(message: Any) -> list[tuple[str, str]]:
    """(name, arguments) of each call, after checking it is a valid call to a declared tool."""
    calls = []
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29, call
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
        calls.append((call.function.name, call.function.arguments))
    return calls


def test_required_calls_always_validate(client: openai.OpenAI) -> None:
    names: set[str] = set()
    numbers_of_calls: set[int] = set()
    for seed in range(5):
        chat = client.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", n=4, seed=seed, max_tokens=300
        )
        for choice in chat.choices:
            assert choice.finish_reason == "tool_calls", choice
            calls = _calls(choice.message)
            assert calls and choice.message.content is None, choice
            names |= {name for name, _ in calls}
            numbers_of_calls.add(len(calls))
    assert names == set(PARAMETERS)  # 20 samples of a random model reach every tool
    assert max(numbers_of_calls) > 1  # parallel calls are allowed by default


def test_a_named_tool_choice_and_parallel_false_make_exactly_one_call(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "book_table"}}
    chat = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice=named, n=4, seed=11, max_tokens=300
    )
    for choice in chat.choices:
        assert choice.finish_reason == "tool_calls"
        assert [name for name, _ in _calls(choice.message)] == ["book_table"]
    single = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        n=6,
        seed=0,
        max_tokens=300,
    )
    for choice in single.choices:
        assert choice.finish_reason == "tool_calls" and len(_calls(choice.message)) == 1


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_streamed_deltas_reassemble_to_the_whole_answer(client: openai.OpenAI, tool_choice: str) -> None:
    fields: dict[str, Any] = dict(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice=tool_choice, seed=5, max_tokens=120
    )
    whole = client.chat.completions.create(**fields).choices[0]
    content, calls, finish_reason = "", {}, None
    for chunk in client.chat.completions.create(**fields, stream=True):
        (choice,) = chunk.choices
        content += choice.delta.content or ""
        finish_reason = choice.finish_reason or finish_reason
        for piece in choice.delta.tool_calls or []:
            if piece.id is not None:  # the first piece of a call: id, type, name, arguments ""
                assert piece.index not in calls and piece.type == "function" and piece.function.name
                assert piece.function.arguments == ""
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            else:
                assert piece.function.name is None and piece.type is None
            calls[piece.index]["arguments"] += piece.function.arguments
    assert sorted(calls) == list(range(len(calls)))
    streamed = [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
    assert streamed == _calls(whole.message)
    assert all(call["id"].startswith("call_") for call in calls.values())
    assert content == (whole.message.content or "")
    assert finish_reason == whole.finish_reason
    if tool_choice == "required":
        assert streamed and finish_reason == "tool_calls"


def test_auto_answers_with_text_or_valid_calls(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, n=8, seed=2, max_tokens=40)
    for choice in chat.choices:
        calls = _calls(choice.message)
        if calls:
            assert choice.finish_reason in ("tool_calls", "length")
        else:
            assert isinstance(choice.message.content, str) and choice.message.tool_calls is None
            assert choice.finish_reason in ("stop", "length")


def test_a_history_of_calls_and_results_is_answered(client: openai.OpenAI) -> None:
    arguments = json.dumps({"guests": 4, "time": {"hour": 19, "minute": 0}})
    history = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "book_table", "arguments": arguments},
                },
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Booked: table 7."},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"error": "city missing"}'},
    ]
    chat = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="required", seed=1, max_tokens=120
    )
    assert chat.choices[0].finish_reason == "tool_calls" and _calls(chat.choices[0].message)
    plain = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=5
    )
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": TOOLS, "guided_choice": ["a", "b"]}, "guided_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}]},
            "tools",
        ),
        ({"tools": [*TOOLS, TOOLS[0]]}, "tools"),
        ({"tools": TOOLS, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)  # fmt: skip
def test_bad_tool_fields_are_a_400_naming_the_field(
    client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    body = {"messages": USER, **fields}
    messages = body.pop("messages")
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, extra_body=body)
    error = raised.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    assert error["type"] == "invalid_request_error"
