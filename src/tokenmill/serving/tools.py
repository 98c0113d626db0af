"""OpenAI's `tools` / `tool_choice` / `parallel_tool_calls` -> what the prompt, the grammar and the answer's
parser need (the format itself is tool_format's, the parser tool_parser's). Refusals name the field, before anything is queued."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.sampling_params import Guidance, InvalidRequestError
from tokenmill.serving.protocol import ChatCompletionRequest, NamedToolChoice
from tokenmill.serving.tool_format import ToolSpec, tool_grammar

NO_PARAMETERS = {"type": "object", "properties": {}}
"""A function declared without `parameters` takes none: its arguments are an empty object."""


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A request whose answer may (or must) be tool calls."""

    specs: list[ToolSpec]
    choice: str
    """"auto", "required" or the one function's name (tool_grammar's `choice`)."""
    parallel: bool

    def guidance(self) -> Guidance:
        """Every call the model writes is a valid call to a declared function; a bad parameters schema is
        caught when the engine compiles this grammar, and named as `tools`. The grammar closes the
        schemas' objects (`closed`); the prompt shows them as declared."""
        specs = [ToolSpec(s.name, s.description, closed(s.parameters)) for s in self.specs]
        return Guidance.lark(tool_grammar(specs, self.choice, self.parallel), param="tools")


_OPEN_KEYS = frozenset(
    {"additionalProperties", "patternProperties", "unevaluatedProperties"}
    | {"allOf", "anyOf", "oneOf", "$ref", "if", "dependentSchemas"}
)
"""Keys beside "properties" that say (or may say, in a subschema) what other keys an object has."""
_SCHEMA_LISTS = ("anyOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties")


def closed(schema: Any) -> Any:
    """`schema` with "additionalProperties": false on each object that lists its "properties" and says
    nothing about others. JSON Schema allows any other key by default, and a small model given that
    freedom copies the schema itself into the arguments ("properties": {"type": ...}) until max_tokens, as
    SmolLM2 does with LangChain's tool schemas, which never close their objects. A closed object accepts
    fewer values, each of which the declared schema accepts, so it is only done where narrowing a part
    narrows the whole (properties, items, anyOf branches), not under oneOf, allOf, not or behind a $ref,
    nor beside keys that may declare more properties (_OPEN_KEYS): an explicit "additionalProperties"
    (true, or a schema) is kept as written."""
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    properties = schema.get("properties")
    if isinstance(properties, dict):
        result["properties"] = {name: closed(sub) for name, sub in properties.items()}
        if not _OPEN_KEYS & schema.keys():
            result["additionalProperties"] = False
    for key in _SCHEMA_VALUES:
        if isinstance(schema.get(key), dict):
            result[key] = closed(schema[key])
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            result[key] = [closed(sub) for sub in schema[key]]
    return result


def tool_use(body: ChatCompletionRequest) -> ToolUse | None:
    """None when the answer is plain content: no tools, or tool_choice "none". With "none" the tools are
    not rendered into the prompt either, so a model has no reason to write calls that would then come back
    as text (the calls in the history are rendered all the same)."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise InvalidRequestError(
                "tool_choice: is only allowed when tools are specified", param="tool_choice"
            )
        return None
    if choice == "none":
        return None
    specs = [
        ToolSpec(
            name=tool.function.name,
            description=tool.function.description or "",
            parameters=NO_PARAMETERS if tool.function.parameters is None else tool.function.parameters,
        )
        for tool in body.tools
    ]
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidRequestError(
            f"tools: function names must be unique; {', '.join(map(repr, repeated))} is declared twice",
            param="tools",
        )
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidRequestError(
                f"tool_choice: the function {choice.function.name!r} is not among the declared tools "
                f"({', '.join(map(repr, names))})",
                param="tool_choice",
            )
        choice_name = choice.function.name
    else:
        choice_name = choice or "auto"
    return ToolUse(specs, choice_name, parallel=body.parallel_tool_calls is not False)


def new_call_id() -> str:
    """OpenAI's shape ("call_" and 24 characters): clients only echo it back in the tool message."""
    return "call_" + secrets.token_hex(12)
