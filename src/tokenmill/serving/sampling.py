"""OpenAI sampling fields -> the engine's SamplingParams. OpenAI's ranges are checked by the protocol models;
the engine's own rules by SamplingParams itself, which names the field in its error."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tokenmill.engine.sampling_params import Guidance, InvalidRequestError, Priority, SamplingParams
from tokenmill.serving.protocol import (
    GenerationRequest,
    JSONObjectFormat,
    JSONSchemaResponseFormat,
)
from tokenmill.serving.settings import CompletionLimits
from tokenmill.serving.tools import ToolUse

if TYPE_CHECKING:
    from tokenmill.engine.lora import LoRARequest

_SMALLEST_TOP_P = 1e-8  # OpenAI accepts top_p=0 ("only the most likely token"); the engine wants (0, 1]


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not raw:
        return None
    bias = {}
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias: keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"logit_bias: token id {token_id} is not in [0, {vocab_size})", param="logit_bias"
            )
        bias[token_id] = value
    return bias


def completion_length(
    requested: int | None,
    param: str,
    limits: CompletionLimits,
    *,
    num_prompt_tokens: int,
    max_model_len: int,
    openai_default: int | None,
) -> int:
    """The max_tokens a request runs with: what it asked for, within the model's cap; else the server's
    default, cut to what the context window has left; else OpenAI's (`openai_default`, or None for "until
    the window is full")."""
    cap = limits.max_completion_tokens
    if requested is not None:
        if cap is not None and requested > cap:
            raise InvalidRequestError(
                f"{param}: this model writes at most {cap} tokens per completion; you asked for {requested}.",
                param=param,
            )
        return requested
    room = max(1, max_model_len - num_prompt_tokens)
    if cap is not None:
        room = min(room, cap)
    if limits.default_max_tokens is not None:
        return min(limits.default_max_tokens, room)
    return room if openai_default is None else min(openai_default, room)


def sampling_params(
    request: GenerationRequest,
    *,
    max_tokens: int,
    vocab_size: int,
    logprobs: int | None,
    tools: ToolUse | None = None,
    lora: LoRARequest | None = None,
    priority: Priority = Priority.INTERACTIVE,
) -> SamplingParams:
    """`tools`: the chat request's `tool_use`, which the route has already read for the prompt; `lora`: the
    adapter of an adapter model (its ticket's)."""
    top_p = 1.0 if request.top_p is None else max(request.top_p, _SMALLEST_TOP_P)
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    return SamplingParams(
        n=request.n,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=top_p,
        top_k=request.top_k or 0,
        min_p=request.min_p or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=_logit_bias(request.logit_bias, vocab_size),
        seed=request.seed,
        max_tokens=max_tokens,
        stop=tuple(stop),
        logprobs=logprobs,
        guidance=guidance(request, tools),
        lora=lora,
        priority=priority,
    )


def guidance(request: GenerationRequest, tools: ToolUse | None) -> Guidance | None:
    """What the output must match: tool calls (`tools`, from `tool_use`), OpenAI's `response_format`, or
    one of vLLM's `guided_*` fields. One grammar constrains a sequence, so these exclude each other."""
    asked = [
        param
        for param, value in (
            ("tools", tools is not None),
            ("response_format", request.response_format and request.response_format.type != "text"),
            ("guided_json", request.guided_json is not None),
            ("guided_regex", request.guided_regex is not None),
            ("guided_choice", request.guided_choice is not None),
        )
        if value
    ]
    if len(asked) > 1:
        raise InvalidRequestError(
            f"{asked[1]}: cannot be combined with {asked[0]}; ask for one output format.", param=asked[1]
        )
    if tools is not None:
        return tools.guidance()
    response_format = request.response_format
    if isinstance(response_format, JSONSchemaResponseFormat):
        schema = response_format.json_schema.schema_
        return Guidance.json_object() if schema is None else Guidance.json_schema(schema)
    if isinstance(response_format, JSONObjectFormat):
        return Guidance.json_object()
    if request.guided_json is not None:
        return Guidance.json_schema(_schema_object(request.guided_json), param="guided_json")
    if request.guided_regex is not None:
        return Guidance.regex(request.guided_regex, param="guided_regex")
    if request.guided_choice is not None:
        return Guidance.choice(request.guided_choice, param="guided_choice")
    return None


def _schema_object(schema: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(schema, dict):
        return schema
    try:
        parsed = json.loads(schema)
    except ValueError as exc:
        raise InvalidRequestError(f"guided_json: not valid JSON ({exc})", param="guided_json") from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError("guided_json: must be a JSON schema object", param="guided_json")
    return parsed
