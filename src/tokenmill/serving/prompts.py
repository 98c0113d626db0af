"""Request bodies -> token ids for the engine: chat messages through the model's own chat template,
completion prompts in OpenAI's four accepted forms."""

from __future__ import annotations

from typing import Any

import jinja2

from tokenmill.engine.sampling_params import InvalidRequestError
from tokenmill.serving.errors import APIError
from tokenmill.serving.protocol import ChatMessage


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


def render_chat(tokenizer: Any, messages: list[ChatMessage], model: str) -> list[int]:
    """Rendered to text and then encoded without extra special tokens: the template already holds them, as
    `apply_chat_template(tokenize=True)` does it."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400,
            f"The model `{model}` has no chat template; use /v1/completions with a plain prompt instead.",
            param="messages",
            code="chat_template_missing",
        )
    conversation = []
    for i, message in enumerate(messages):
        if message.role in ("tool", "function"):
            raise APIError(
                400,
                f"messages[{i}].role: {message.role!r} messages need tool calling, which is not supported.",
                param=f"messages[{i}].role",
            )
        role = "system" if message.role == "developer" else message.role
        conversation.append({"role": role, "content": _message_text(message, i)})
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as exc:  # templates raise on e.g. roles that do not alternate
        raise APIError(
            400, f"messages: the model's chat template rejected them: {exc}", param="messages"
        ) from exc
    return list(tokenizer.encode(text, add_special_tokens=False))


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
