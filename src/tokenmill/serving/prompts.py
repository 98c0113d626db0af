"""Request bodies -> token ids for the engine: chat messages through the model's own chat template,
completion prompts in OpenAI's four accepted forms."""

from __future__ import annotations

import json
from typing import Any

import jinja2

from tokenmill.engine.sampling_params import InvalidRequestError
from tokenmill.serving.errors import APIError
from tokenmill.serving.protocol import ChatMessage
from tokenmill.serving.tool_format import CALL_CLOSE, CALL_OPEN, ToolSpec, tool_prompt


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise APIError(
                400,
                f"messages[{index}].content[{j}]: only text parts are supported, got {part.type!r}.",
                param=f"messages[{index}].content[{j}].type",
            )
        texts.append(part.text)
    return "\n".join(texts)


def render_chat(
    tokenizer: Any, messages: list[ChatMessage], model: str, tools: list[ToolSpec] | None = None
) -> list[int]:
    """Rendered to text and then encoded without extra special tokens: the template already holds them, as
    `apply_chat_template(tokenize=True)` does it.

    `tools` (None: the answer is not tool calls) reach the model in one of two ways. A template that renders
    tools itself (its source mentions `tools`: Qwen, Hermes, Llama 3.1, ...) gets them as `tools=` and the
    history in the shape Hugging Face templates expect (assistant `tool_calls` with arguments as objects,
    `tool` messages with their `tool_call_id`). Any other template (SmolLM2's plain ChatML) gets the tools as
    text: tool_prompt() at the end of the system message (or as one), earlier calls written into the
    assistant's content as `<tool_call>{...}</tool_call>` lines, exactly as the grammar makes the model write
    them, and tool results as a user turn of `<tool_response>...</tool_response>` blocks (consecutive
    results in one turn), as Qwen2.5's template renders them: every ChatML template accepts a user turn,
    while a "tool" role is one the model never saw."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise APIError(
            400,
            f"The model `{model}` has no chat template; use /v1/completions with a plain prompt instead.",
            param="messages",
            code="chat_template_missing",
        )
    for i, message in enumerate(messages):
        _check_tool_fields(message, i)
    native = "tools" in str(template)
    conversation = _conversation(messages) if native else _plain_conversation(messages, tools)
    extra: dict[str, Any] = {}
    if native and tools:
        extra["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
            }
            for t in tools
        ]
    try:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True, **extra
        )
    except jinja2.TemplateError as exc:  # templates raise on e.g. roles that do not alternate
        raise APIError(
            400, f"messages: the model's chat template rejected them: {exc}", param="messages"
        ) from exc
    return list(tokenizer.encode(text, add_special_tokens=False))


def _check_tool_fields(message: ChatMessage, index: int) -> None:
    if message.role == "function":
        raise APIError(
            400,
            f"messages[{index}].role: 'function' messages belong to the legacy function calling, which is "
            "not supported; use tools and 'tool' messages.",
            param=f"messages[{index}].role",
        )
    if message.role == "tool" and not message.tool_call_id:
        raise APIError(
            400,
            f"messages[{index}].tool_call_id: a 'tool' message must name the call it answers.",
            param=f"messages[{index}].tool_call_id",
        )
    if message.tool_calls and message.role != "assistant":
        raise APIError(
            400,
            f"messages[{index}].tool_calls: only assistant messages carry tool calls.",
            param=f"messages[{index}].tool_calls",
        )


def _arguments(text: str) -> Any:
    """The arguments object a call's JSON text holds; text that is not one (a call cut short, or a client's
    own) is passed on as it is rather than refused: it is history, the model only reads it."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    conversation = []
    for i, message in enumerate(messages):
        entry: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": _message_text(message, i),
        }
        if message.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    },
                }
                for call in message.tool_calls
            ]
        if message.role == "tool":
            entry["tool_call_id"] = message.tool_call_id
            if message.name:
                entry["name"] = message.name
        conversation.append(entry)
    return conversation


def _plain_conversation(messages: list[ChatMessage], tools: list[ToolSpec] | None) -> list[dict[str, Any]]:
    conversation: list[dict[str, Any]] = []
    after_tool = False
    for i, message in enumerate(messages):
        text = _message_text(message, i)
        if message.role == "tool":
            block = f"<tool_response>\n{text}\n</tool_response>"
            if after_tool:
                conversation[-1]["content"] += "\n" + block
            else:
                conversation.append({"role": "user", "content": block})
            after_tool = True
            continue
        after_tool = False
        if message.tool_calls:
            calls = [
                CALL_OPEN
                + json.dumps(
                    {"name": call.function.name, "arguments": _arguments(call.function.arguments)},
                    ensure_ascii=False,
                    separators=(",", ":"),
                )
                + CALL_CLOSE
                for call in message.tool_calls
            ]
            text = "\n".join([text, *calls] if text else calls)
        role = "system" if message.role == "developer" else message.role
        conversation.append({"role": role, "content": text})
    if tools:
        prompt = tool_prompt(tools)
        if conversation and conversation[0]["role"] == "system":
            first = conversation[0]["content"]
            conversation[0]["content"] = f"{first}\n\n{prompt}" if first else prompt
        else:
            conversation.insert(0, {"role": "system", "content": prompt})
    return conversation


def prompt_list(value: str | list[str] | list[int] | list[list[int]], param: str) -> list[str | list[int]]:
    """OpenAI's four forms of a prompt (or embedding input): a string, strings, token ids (one prompt),
    lists of token ids (several). Empty prompts are refused: there is nothing to continue or embed."""
    prompts: list[str | list[int]]
    if isinstance(value, str):
        prompts = [value]
    elif value and all(isinstance(item, int) for item in value):
        prompts = [[int(item) for item in value]]  # type: ignore[arg-type]
    else:
        prompts = [item if isinstance(item, str) else list(item) for item in value]  # type: ignore[arg-type]
    if not prompts:
        raise InvalidRequestError(f"{param}: must not be empty", param=param)
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise InvalidRequestError(f"{param}[{i}]: must not be empty", param=param)
    return prompts


def encode_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """The same encoding the engine applies to text prompts (with the tokenizer's special tokens)."""
    return list(tokenizer(prompt).input_ids) if isinstance(prompt, str) else prompt
