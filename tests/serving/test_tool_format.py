"""The Hermes/Qwen tool-call format: the prompt text, the grammar (checked with llguidance over the real
SmolLM2 tokenizer) and the parsers, whole and streamed, which must agree however the text is split."""

from __future__ import annotations

import json
import random
from typing import Any

import llguidance.hf
import pytest
from llguidance import LLMatcher, LLTokenizer

from tokenmill.engine.guidance import grammar_text
from tokenmill.engine.sampling_params import Guidance
from tokenmill.serving.tool_format import ParsedCall, ToolSpec, tool_grammar, tool_prompt
from tokenmill.serving.tool_parser import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    StreamEvent,
    ToolCallStream,
    parse_tool_calls,
)

WEATHER = ToolSpec(
    "get_weather",
    "The current weather in a city.",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
NOOP = ToolSpec("noop", "Does nothing.", {"type": "object", "properties": {}})
TOOLS = [WEATHER, NOOP]


def call(name: str, arguments: Any, raw: str | None = None) -> str:
    body = (
        raw if raw is not None else json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"))
    )
    return f"<tool_call>{body}</tool_call>"


# -- parse_tool_calls ----------------------------------------------------------------------------------


def test_parse_content_and_two_calls() -> None:
    text = (
        "Let me look both up.\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>\n'
        '<tool_call>\n{"name":"noop","arguments":{}}\n</tool_call>'
    )
    assert parse_tool_calls(text) == (
        "Let me look both up.",
        [
            ParsedCall("get_weather", '{"city":"Paris","unit":"celsius"}'),
            ParsedCall("noop", "{}"),
        ],
    )


def test_parse_without_calls_is_all_content() -> None:
    assert parse_tool_calls("  The weather is fine.\n") == ("The weather is fine.", [])
    assert parse_tool_calls("") == (None, [])
    assert parse_tool_calls('<tool_call>{"name":"noop","arguments":{}}</tool_call>') == (
        None,
        [ParsedCall("noop", "{}")],
    )


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call>",
        "<tool_call> is the tag I would use",
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',  # never closed
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris",}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {}, "id": 3}</tool_call>',
        '<tool_call>{"name": "", "arguments": {}}</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"a": 1, "a": 2}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"s": "\\ud800"}}</tool_call>',  # lone surrogate
        '<tool_call>{"name": "f", "arguments": {"x": 1e999}}</tool_call>',  # not a finite number
        '<tool_call>{"name": "f", "arguments": {"s": "a\nb"}}</tool_call>',  # raw control character
        '<tool_call>{"name": "f", "arguments": {}} trailing</tool_call>',
    ],
)
def test_a_malformed_call_stays_in_the_content(bad: str) -> None:
    assert parse_tool_calls(f"Calling: {bad}") == (f"Calling: {bad}".strip(), [])


def test_a_malformed_call_does_not_hide_a_good_one_after_it() -> None:
    good = call("noop", {})
    assert parse_tool_calls(f"<tool_call>oops {good}") == ("<tool_call>oops", [ParsedCall("noop", "{}")])


def test_arguments_are_the_compact_json_of_what_the_model_wrote() -> None:
    arguments = (
        '{ "text": "quote \\" backslash \\\\ slash \\/ tab \\t nl \\n \\u00e9\\u0001 \\ud83d\\ude00 日本",'
        ' "n": [1.50, -0, 9E3, 0.9, 12345678901234567890, -2.5e-3], "ok": true, "no": false, "none": null,'
        ' "nested": {"a": {"b": []}, "c": [{}]} }'
    )
    _, calls = parse_tool_calls(f'<tool_call>{{"name": "f", "arguments": {arguments}}}</tool_call>')
    assert calls == [
        ParsedCall("f", json.dumps(json.loads(arguments), separators=(",", ":"), ensure_ascii=False))
    ]


# -- ToolCallStream ------------------------------------------------------------------------------------

STREAM_TEXTS = [
    "Just content, no calls at all.\nSecond line with a < sign and <tool_ca",
    "Checking." + call("get_weather", {"city": "Paris"}),
    call("get_weather", {"city": "Paris"}) + "\n" + call("noop", {}),
    "Two at once:\n" + call("noop", {}) + call("get_weather", {"city": "Oslo", "unit": "celsius"}),
    call("f", {"deep": {"list": [1, 2.5, {"x": None}], "flag": True, "empty": {}}, "n": -12e3}),
    call("f", {"html": "</tool_call> and <tool_call> inside a string", "q": 'say "hi" \\ now'}),
    call("f", {"text": "héllo wörld 😀 日本語", "tab": "a\tb\nc"}),
    call("f", None, raw='{"name":"f","arguments":{"e":"\\u00e9\\ud83d\\ude00\\/\\u0007"}}'),
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\nAnything else?',
    call("f", None, raw='{"arguments": {"late": "name"}, "name": "f"}'),
    "Literally <tool_call> is the tag." + call("noop", {}),
    '<tool_call>{"nam',  # cut before the name is complete: content, whole or streamed
    '<tool_call>{"name": 5}</tool_call> then ' + call("noop", {}),
    "  \n  ",
]


def stream_events(deltas: list[str]) -> list[StreamEvent]:
    stream = ToolCallStream()
    events: list[StreamEvent] = []
    for delta in deltas:
        events += stream.feed(delta)
    return events + stream.finish()


def collect(events: list[StreamEvent]) -> tuple[str | None, list[ParsedCall]]:
    """The streamed events as parse_tool_calls' result; checks that each call's index is the next one and
    that its arguments come after its start."""
    content = ""
    names: list[str] = []
    arguments: list[str] = []
    for event in events:
        if isinstance(event, ContentDelta):
            assert event.text
            content += event.text
        elif isinstance(event, CallStart):
            assert event.index == len(names)
            names.append(event.name)
            arguments.append("")
        else:
            assert isinstance(event, ArgumentsDelta) and event.index < len(names) and event.fragment
            arguments[event.index] += event.fragment
    return content or None, [ParsedCall(name, args) for name, args in zip(names, arguments, strict=True)]


def splits(text: str) -> list[list[str]]:
    by_size = [[text[i : i + size] for i in range(0, len(text), size)] for size in (1, 2, 3)]
    rng = random.Random(text)
    at_random = []
    for _ in range(20):
        cuts = (
            sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
            if len(text) > 1
            else []
        )
        bounds = [0, *cuts, len(text)]
        at_random.append([text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])
    return [*by_size, [text], *at_random]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streamed_equals_parsed_for_every_split(text: str) -> None:
    """Content: all text outside calls, stripped; calls: names and compact arguments, in order."""
    expected = parse_tool_calls(text)
    for deltas in splits(text):
        assert collect(stream_events(deltas)) == expected, deltas


def test_stream_sends_content_at_once_and_holds_only_a_possible_tag() -> None:
    stream = ToolCallStream()
    assert stream.feed("Sure, <to") == [ContentDelta("Sure,")]  # the blank waits for more content
    assert stream.feed("day") == [ContentDelta(" <today")]
    assert stream.feed("! <tool_call>") == [ContentDelta("!")]
    assert stream.feed('{"name": "get_weather"') == [CallStart(0, "get_weather")]
    assert stream.feed(', "arguments": {"city": "Pa') == [ArgumentsDelta(0, '{"city":"Pa')]
    assert stream.feed('ris", "n": 12') == [ArgumentsDelta(0, 'ris","n":')]  # 12 may go on: 123, 12.5
    assert stream.feed("}}</tool_call>") == [ArgumentsDelta(0, "12}")]
    assert stream.finish() == []


def test_a_call_cut_short_after_its_name_stays_a_partial_call_when_streamed() -> None:
    """A stream cannot take back a call it has announced (e.g. max_tokens ends the answer mid-call); the
    whole answer, parsed at once, keeps such a call as content."""
    text = 'Hi <tool_call>{"name": "get_weather", "arguments": {"city": "Par'
    assert collect(stream_events([text])) == ("Hi", [ParsedCall("get_weather", '{"city":"Par')])
    assert parse_tool_calls(text) == (text, [])


# -- tool_grammar --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ll_tokenizer(smollm2_tokenizer: Any) -> LLTokenizer:
    return llguidance.hf.from_tokenizer(smollm2_tokenizer)


class Checker:
    """Feeds texts, tokenized by the real tokenizer, to the compiled tool grammar."""

    def __init__(self, tokenizer: Any, ll_tokenizer: LLTokenizer, grammar: str) -> None:
        self.tokenizer = tokenizer
        self.matcher = LLMatcher(ll_tokenizer, grammar_text(Guidance.lark(grammar, "tools")), log_level=0)
        assert not self.matcher.is_error(), self.matcher.get_error()

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def consumed(self, text: str, matcher: LLMatcher | None = None) -> int:
        """How many of the text's tokens the grammar accepts, from the start (or from `matcher`'s state)."""
        return (matcher or self.matcher.deep_copy()).try_consume_tokens(self.tokens(text))

    def accepts(self, text: str) -> bool:
        """The whole text is accepted and is a complete answer (EOS may follow)."""
        matcher = self.matcher.deep_copy()
        tokens = self.tokens(text)
        return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


def checker(tokenizer: Any, ll_tokenizer: LLTokenizer, choice: str, parallel: bool) -> Checker:
    return Checker(tokenizer, ll_tokenizer, tool_grammar(TOOLS, choice, parallel))


WEATHER_CALL = call("get_weather", {"city": "Paris", "unit": "celsius"})
NOOP_CALL = call("noop", {})
BAD_CALLS = [
    call("delete_everything", {}),  # not declared
    call("get_weather", {"town": "Paris"}),  # unknown property, city missing
    call("get_weather", {"city": 12}),  # wrong type
    call("get_weather", {"city": "Paris", "unit": "kelvin"}),  # not in the enum
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',  # free whitespace
    '<tool_call>{"arguments":{"city":"Paris"},"name":"get_weather"}</tool_call>',  # name must come first
]


def test_required_accepts_calls_only(smollm2_tokenizer: Any, ll_tokenizer: LLTokenizer) -> None:
    grammar = checker(smollm2_tokenizer, ll_tokenizer, "required", parallel=True)
    assert grammar.accepts(WEATHER_CALL)
    assert grammar.accepts('<tool_call>\n{"name":"noop","arguments":{}}\n</tool_call>')  # Qwen's newlines
    assert grammar.accepts(WEATHER_CALL + "\n" + NOOP_CALL + NOOP_CALL + "\n")
    assert grammar.consumed("I would rather answer in words.") == 0
    assert grammar.consumed(" " + WEATHER_CALL) == 0
    assert not grammar.accepts(WEATHER_CALL[:-1])  # the closing tag is part of the call


@pytest.mark.parametrize("bad", BAD_CALLS)
@pytest.mark.parametrize("choice", ["required", "auto"])
def test_an_invalid_call_is_rejected(
    smollm2_tokenizer: Any, ll_tokenizer: LLTokenizer, choice: str, bad: str
) -> None:
    grammar = checker(smollm2_tokenizer, ll_tokenizer, choice, parallel=True)
    text = "Calling it. " + bad if choice == "auto" else bad
    tokens = grammar.tokens(text)
    assert grammar.consumed(text) < len(tokens)
    # ... and the tag itself was fine: it is the call's JSON that is refused.
    head = "Calling it. <tool_call>" if choice == "auto" else "<tool_call>"
    assert grammar.consumed(head) == len(grammar.tokens(head))


def test_a_named_choice_allows_one_call_to_that_function(
    smollm2_tokenizer: Any, ll_tokenizer: LLTokenizer
) -> None:
    for parallel in (False, True):
        grammar = checker(smollm2_tokenizer, ll_tokenizer, "noop", parallel)
        assert grammar.accepts(NOOP_CALL)
        assert grammar.consumed(WEATHER_CALL) < len(grammar.tokens(WEATHER_CALL))
        assert grammar.consumed("Sure.") == 0
        matcher = grammar.matcher.deep_copy()
        assert grammar.consumed(NOOP_CALL, matcher) == len(grammar.tokens(NOOP_CALL))
        assert matcher.is_stopped()  # exactly one call: the answer ends there
        assert grammar.consumed(NOOP_CALL, matcher) == 0


def test_auto_allows_text_or_text_then_calls(smollm2_tokenizer: Any, ll_tokenizer: LLTokenizer) -> None:
    grammar = checker(smollm2_tokenizer, ll_tokenizer, "auto", parallel=True)
    assert grammar.accepts("It is sunny in Paris.\nUse <b>tags</b>, a lone < or even <tool_call")
    assert grammar.accepts("")
    assert grammar.accepts("Let me check.\n" + WEATHER_CALL)
    assert grammar.accepts(WEATHER_CALL + "\n" + NOOP_CALL)
    garbage = "Let me check. <tool_call>garbage"
    assert grammar.consumed(garbage) < len(grammar.tokens(garbage))
    after = WEATHER_CALL + " and some more words"
    assert grammar.consumed(after) < len(grammar.tokens(after))  # the answer ends after the calls


def test_without_parallel_a_second_call_is_rejected(
    smollm2_tokenizer: Any, ll_tokenizer: LLTokenizer
) -> None:
    for choice, first in (("auto", "Sure. " + WEATHER_CALL), ("required", WEATHER_CALL)):
        grammar = checker(smollm2_tokenizer, ll_tokenizer, choice, parallel=False)
        matcher = grammar.matcher.deep_copy()
        assert grammar.consumed(first, matcher) == len(grammar.tokens(first))
        assert matcher.is_accepting() and matcher.is_stopped()
        assert grammar.consumed(NOOP_CALL, matcher) == 0
        assert grammar.consumed("\n" + NOOP_CALL, matcher) == 0


def test_local_references_of_a_parameters_schema_still_resolve(
    smollm2_tokenizer: Any, ll_tokenizer: LLTokenizer
) -> None:
    place = {
        "type": "object",
        "properties": {"at": {"$ref": "#/$defs/point"}, "near": {"$ref": "#"}},
        "required": ["at"],
        "additionalProperties": False,
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
    }
    grammar = Checker(
        smollm2_tokenizer, ll_tokenizer, tool_grammar([NOOP, ToolSpec("go", "", place)], "go", False)
    )
    assert grammar.accepts(call("go", {"at": {"x": 1}, "near": {"at": {"x": 2}}}))
    bad = call("go", {"at": {"x": "one"}})
    assert grammar.consumed(bad) < len(grammar.tokens(bad))


def test_tool_grammar_refuses_what_it_cannot_build() -> None:
    with pytest.raises(ValueError, match="'delete'.*'get_weather', 'noop'"):
        tool_grammar(TOOLS, "delete", parallel=False)
    with pytest.raises(ValueError, match="unique"):
        tool_grammar([NOOP, NOOP], "auto", parallel=False)
    with pytest.raises(ValueError, match="at least one"):
        tool_grammar([], "auto", parallel=False)


# -- tool_prompt ---------------------------------------------------------------------------------------


def test_tool_prompt_lists_every_tool_and_the_exact_format() -> None:
    prompt = tool_prompt(TOOLS)
    assert prompt == tool_prompt(list(TOOLS))
    for tool in TOOLS:
        line = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
        assert json.dumps(line, ensure_ascii=False) in prompt.splitlines()
    assert '<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>' in prompt
