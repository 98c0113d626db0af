"""Tool calling without a model: how `tools`, `tool_choice` and a history of calls and results become the
prompt (through a template that renders tools, and through SmolLM2's plain ChatML one), which requests are
refused and naming which field, and that the streamed tool-call deltas reassemble to the non-streamed
answer however the text is cut. The model side is tests/serving/test_tools.py."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from tokenmill.engine.sampling_params import InvalidRequestError, SamplingParams
from tokenmill.serving.deltas import ChoiceDelta
from tokenmill.serving.errors import APIError
from tokenmill.serving.prompts import render_chat
from tokenmill.serving.protocol import ChatCompletionRequest, ChatMessage
from tokenmill.serving.routes.chat import _message, _Response
from tokenmill.serving.sampling import guidance
from tokenmill.serving.tool_format import CALL_CLOSE, CALL_OPEN, ToolSpec
from tokenmill.serving.tools import closed, tool_use

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
]  # fmt: skip
NATIVE_TEMPLATE = (
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.id }} {{ c.function.name }} {{ c.function.arguments | tojson }}]"
    "{% endfor %}{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}\n{% endfor %}"
)


def _request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY, **fields})


def _guidance(request: ChatCompletionRequest) -> object:
    """As the chat route builds it: the request's tools read once, then the one grammar."""
    return guidance(request, tool_use(request))


def _render(tokenizer: PreTrainedTokenizerBase, body: ChatCompletionRequest) -> str:
    use = tool_use(body)
    ids = render_chat(tokenizer, body.messages, "m", use.specs if use is not None else None)
    return tokenizer.decode(ids)


def test_a_plain_chatml_template_gets_the_tools_as_text(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    text = _render(smollm2_tokenizer, _request(tools=[WEATHER, CLOCK]))
    system = text[: text.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '"name": "get_weather"' in system and '"name": "get_time"' in system
    assert (
        "<|im_start|>assistant\n"
        f'{CALL_OPEN}{{"name":"get_weather","arguments":{{"city":"Paris"}}}}{CALL_CLOSE}\n'
        f'{CALL_OPEN}{{"name":"get_time","arguments":{{}}}}{CALL_CLOSE}<|im_end|>\n'
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\nSunny, 21 C\n</tool_response>\n"
        "<tool_response>\n12:00\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ) in text
    # tool_choice "none": the history is still rendered, the tools are not offered.
    assert "# Tools" not in _render(smollm2_tokenizer, _request(tools=[WEATHER, CLOCK], tool_choice="none"))
    without_system = _request(tools=[WEATHER], messages=HISTORY[1:2])
    assert _render(smollm2_tokenizer, without_system).startswith("<|im_start|>system\n# Tools")


def test_a_template_that_renders_tools_gets_them_as_hugging_face_expects(
    smollm2_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", NATIVE_TEMPLATE)
    text = _render(smollm2_tokenizer, _request(tools=[WEATHER, CLOCK]))
    tools = json.loads(text.splitlines()[0].removeprefix("TOOLS "))
    assert [t["function"]["name"] for t in tools] == ["get_weather", "get_time"]
    assert tools[1]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert '<assistant>[call_1 get_weather {"city": "Paris"}][call_2 get_time {}]' in text
    assert "<tool>Sunny, 21 C#call_1<tool>12:00#call_2" in text  # (trim_blocks eats the newlines)
    assert not _render(smollm2_tokenizer, _request(tools=[WEATHER], tool_choice="none")).startswith("TOOLS")


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "function", "name": "f", "content": "x"}], "messages[0].role"),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
        (
            [{"role": "user", "content": "x", "tool_calls": HISTORY[2]["tool_calls"]}],
            "messages[0].tool_calls",
        ),
    ],
)
def test_malformed_tool_messages_are_refused(
    smollm2_tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], param: str
) -> None:
    parsed = [ChatMessage.model_validate(message) for message in messages]
    with pytest.raises(APIError) as raised:
        render_chat(smollm2_tokenizer, parsed, "m")
    assert raised.value.param == param


def test_tool_choice_and_parallel_calls_become_the_grammar_choice() -> None:
    assert tool_use(_request()) is None
    assert tool_use(_request(tools=[WEATHER], tool_choice="none")) is None
    auto = tool_use(_request(tools=[WEATHER, CLOCK]))
    assert auto is not None and (auto.choice, auto.parallel) == ("auto", True)
    assert auto.specs[1] == ToolSpec("get_time", "", {"type": "object", "properties": {}})
    named = {"type": "function", "function": {"name": "get_time"}}
    one = tool_use(_request(tools=[WEATHER, CLOCK], tool_choice=named, parallel_tool_calls=False))
    assert one is not None and (one.choice, one.parallel) == ("get_time", False)
    constraint = _guidance(_request(tools=[WEATHER], tool_choice="required"))
    assert constraint is not None and constraint.kind == "lark" and constraint.param == "tools"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [WEATHER], "guided_regex": "a+"}, "guided_regex"),
    ],
)  # fmt: skip
def test_conflicting_tool_fields_name_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        _guidance(_request(**fields))
    assert raised.value.param == param


ANSWERS = [
    f'{CALL_OPEN}{{"name":"get_weather","arguments":{{"city":"Par\\u00efs \\"x\\""}}}}{CALL_CLOSE}\n'
    f'{CALL_OPEN}{{"name":"get_time","arguments":{{}}}}{CALL_CLOSE}',
    f'Let me check. {CALL_OPEN}\n{{"name":"get_weather","arguments":{{"city":"Rome","n":[1.50,-2e3]}}}}\n{CALL_CLOSE}',
    "Just text, no < calls at all.  ",
]  # fmt: skip


@pytest.mark.parametrize("answer", ANSWERS)
def test_streamed_tool_call_deltas_reassemble_to_the_whole_answer(answer: str) -> None:
    message, finish_reason = _message(answer, "stop", tools=True)
    response = _Response(_request(stream=True), None, SamplingParams(), tools=True)  # type: ignore[arg-type]
    cuts = sorted(random.Random(answer).sample(range(1, len(answer)), 12))
    pieces = [answer[i:j] for i, j in zip([0, *cuts], [*cuts, len(answer)], strict=True)]
    chunks = [
        json.loads(chunk)["choices"][0]
        for n, piece in enumerate(pieces)
        for chunk in response.delta_chunks(
            ChoiceDelta(0, piece, [], 1, "stop" if n == len(pieces) - 1 else None)
        )
    ]
    content = "".join(c["delta"].get("content", "") for c in chunks)
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for piece in c["delta"].get("tool_calls", []):
            if "id" in piece:
                assert piece["index"] not in calls and piece["type"] == "function"
                assert piece["id"].startswith("call_") and len(piece["id"]) == 29
                calls[piece["index"]] = {"name": piece["function"]["name"], "arguments": ""}
            else:
                assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
            calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
    expected = [
        {"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []
    ]
    assert [calls[i] for i in sorted(calls)] == expected
    assert content == (message.content or "")
    assert chunks[-1]["finish_reason"] == finish_reason == ("tool_calls" if expected else "stop")
    if expected:
        assert json.loads(expected[0]["arguments"])["city"] in ('Parïs "x"', "Rome")
    assert _message(answer, "length", tools=True)[1] == "length"


def test_the_grammar_closes_objects_only_where_that_keeps_every_answer_valid() -> None:
    point = {"type": "object", "properties": {"x": {"type": "number"}}}
    schema = {
        "type": "object",
        "properties": {
            "a": point,
            "b": {"type": "array", "items": point},
            "c": {"anyOf": [point, {"type": "null"}]},
            "d": {"oneOf": [point, {"type": "string"}]},
            "e": {**point, "additionalProperties": {"type": "string"}},
            "f": {**point, "allOf": [{"properties": {"y": {"type": "number"}}}]},
            "g": {"$ref": "#/$defs/point"},
        },
        "$defs": {"point": point},
    }
    shut = {**point, "additionalProperties": False}
    assert closed(schema) == {
        **schema,
        "properties": {
            "a": shut,
            "b": {"type": "array", "items": shut},
            "c": {"anyOf": [shut, {"type": "null"}]},
            "d": schema["properties"]["d"],
            "e": schema["properties"]["e"],
            "f": schema["properties"]["f"],
            "g": schema["properties"]["g"],
        },
        "additionalProperties": False,
    }
    assert closed({"type": "object"}) == {"type": "object"}
    constraint = _guidance(_request(tools=[CLOCK], tool_choice="required"))
    assert (
        constraint is not None
        and '"arguments":{"type":"object","properties":{},"additionalProperties":false}' in constraint.spec
    )
