"""OpenAI `tools` on open models: the Hermes/Qwen tool-call format many of them are trained on.

A call in the model's output is `<tool_call>{"name": "<function>", "arguments": {...}}</tool_call>`; several
calls may follow each other (parallel calls), and text before the first call is ordinary content. This
module holds the format and nothing about HTTP: the system-prompt text for models whose chat template does
not render tools, and the grammar that makes the model's calls valid (`Guidance.lark`). `tool_parser` turns
the output back into content and calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function the model may call, as the request declared it."""

    name: str
    description: str
    parameters: dict[str, Any]
    """A JSON schema for the arguments object; {"type": "object", "properties": {}} when the tool declares
    none."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a tool's name must be a non-empty string")
        if not isinstance(self.description, str):
            raise ValueError(f"tool {self.name!r}: the description must be a string")
        if not isinstance(self.parameters, dict):
            raise ValueError(f"tool {self.name!r}: the parameters must be a JSON schema object")


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str
    """The arguments object as compact JSON text, what OpenAI's `function.arguments` carries:
    json.dumps(obj, separators=(",", ":"), ensure_ascii=False) of the object the model wrote."""


# -- prompt --------------------------------------------------------------------------------------------


def tool_prompt(tools: list[ToolSpec]) -> str:
    """The system-prompt text for models whose chat template does not render tools. It follows the wording
    of Qwen2.5's template, which Hermes-style models have seen in training, with the call written compactly
    on one line as tool_grammar enforces it. Deterministic, so equal tool lists share a prefix-cache entry."""
    lines = [
        json.dumps(
            {"name": t.name, "description": t.description, "parameters": t.parameters}, ensure_ascii=False
        )
        for t in tools
    ]
    return (
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        "<tools>\n" + "\n".join(lines) + "\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f"{CALL_OPEN}{CALL_CLOSE} XML tags:\n"
        f'{CALL_OPEN}{{"name": <function-name>, "arguments": <args-json-object>}}{CALL_CLOSE}'
    )


# -- grammar -------------------------------------------------------------------------------------------

_TEXT_WITHOUT_CALL = r"/(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/"
"""Free text that does not contain the call tag: once the model writes the tag it has left free text and
must write a call (otherwise `<tool_call>` followed by anything would still be "text")."""
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
"""Schema keywords whose values are data, where a "$ref" key is not a reference."""
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
"""Schema keywords whose values map names (any text, even "$ref" or "const") to schemas."""


def tool_grammar(tools: list[ToolSpec], choice: str, parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect, for Guidance.lark) for the assistant's whole answer.

    choice "required": one or more calls (exactly one unless `parallel`) and nothing else; a function name:
    exactly one call, to that function; "auto": free text, or text and then calls: the text is free until
    the model writes `<tool_call>`, after which the call must be valid, and the answer ends after the last
    call (unless `parallel`, when another call may follow). Between parallel calls, after the last one, and
    just inside the tags a single newline is allowed, as Qwen and Hermes models write them; a model that
    ends a line after its last call is not forced into another call.

    Each call is checked by one JSON schema, "oneOf" over the allowed functions (the name is a const, so
    exactly one matches), with compact JSON: free whitespace lets a weak model emit blanks forever.
    A function literally named "auto" or "required" cannot be chosen by name: the words win.
    """
    if not tools:
        raise ValueError("tools: at least one function is needed for a tool-call grammar")
    names = [tool.name for tool in tools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"tools: function names must be unique, {', '.join(map(repr, duplicates))} repeats")
    if choice in ("auto", "required"):
        allowed = tools
    elif choice in names:
        allowed = [tools[names.index(choice)]]
    else:
        raise ValueError(
            f"tool_choice: {choice!r} is neither 'auto', 'required' nor one of the declared functions "
            f"({', '.join(map(repr, names))})"
        )
    call_schema = {
        # Applies to the whole %json schema (nested "x-guidance" keys are ignored by llguidance).
        "x-guidance": {"whitespace_flexible": False},
        "oneOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool.name},
                    "arguments": _rebase_refs(tool.parameters, f"#/oneOf/{i}/properties/arguments"),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for i, tool in enumerate(allowed)
        ],
    }
    more_calls = " (NL? call)* NL?" if parallel else ""
    if choice == "auto":
        # lazy: the head ends at the first tag, so the call's grammar takes over right there.
        rules = [
            f"start: TEXT | head body{more_calls}",
            f'head[lazy]: TEXT "{CALL_OPEN}"',
            f"TEXT: {_TEXT_WITHOUT_CALL}",
        ]
    else:
        rules = [f"start: call{more_calls if choice == 'required' else ''}"]
    schema = json.dumps(call_schema, separators=(",", ":"))
    return "\n".join(
        [
            "%llguidance {}",
            *rules,
            f'call: "{CALL_OPEN}" body',
            f'body: NL? %json {schema} NL? "{CALL_CLOSE}"',
            'NL: "\\n"',
        ]
    )


def _rebase_refs(schema: Any, base: str) -> Any:
    """A tool's parameters schema moved under `base`: its local references ("#/$defs/...", "#") pointed
    at its own root, which inside the call schema is `base`."""
    if isinstance(schema, list):
        return [_rebase_refs(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    rebased: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            rebased[key] = base + value[1:]
        elif key in _DATA_KEYWORDS:
            rebased[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            rebased[key] = {name: _rebase_refs(sub, base) for name, sub in value.items()}
        else:
            rebased[key] = _rebase_refs(value, base)
    return rebased
