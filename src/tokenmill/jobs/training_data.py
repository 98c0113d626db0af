"""Fine-tuning data in OpenAI's chat format (JSONL, one `{"messages": [...]}` per line): every problem found
up front with its line number, then each conversation tokenized exactly as the server will see it.

Validation runs before a job is queued, so a user learns about line 7 in seconds rather than after an hour in
the queue. Tokenization matters as much: the fine-tuned model is later prompted through the server's chat
rendering (`apply_chat_template(..., add_generation_prompt=True)` encoded without extra special tokens), so the
prompt before every assistant turn here is that same rendering, token for token. Only what the model must
produce after that prompt is trained: the assistant's text and the end-of-turn token that lets it stop
(`<|im_end|>` for ChatML); system, user and template tokens get the label -100.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jinja2

IGNORE_INDEX = -100
"""The label of tokens the loss skips (the convention of PyTorch's cross entropy and transformers)."""
MIN_EXAMPLES = 10
"""OpenAI's minimum number of training examples; fewer rarely teach anything."""
MAX_FILE_BYTES = 512 * 1024 * 1024
"""OpenAI's limit on a fine-tuning file."""
MAX_REPORTED_PROBLEMS = 20

_ROLES = ("system", "user", "assistant")
_MESSAGE_FIELDS = {"role", "content", "name", "weight"}
_UNSUPPORTED_EXAMPLE_FIELDS = ("tools", "functions", "parallel_tool_calls")
_UNSUPPORTED_MESSAGE_FIELDS = ("tool_calls", "function_call", "tool_call_id")
_TOOLS_UNSUPPORTED = "fine-tuning on tool or function calls is not supported; remove it from the example"


class TrainingDataError(ValueError):
    """The file cannot be trained on. `problems` holds the first (line, message) pairs (line None: the file as a
    whole), `total` how many problems were found in all."""

    def __init__(self, problems: list[tuple[int | None, str]], total: int | None = None) -> None:
        self.problems = problems[:MAX_REPORTED_PROBLEMS]
        self.total = len(problems) if total is None else total
        shown = "; ".join(_describe(line, message) for line, message in self.problems[:3])
        more = self.total - min(3, len(self.problems))
        super().__init__(shown + (f" (and {more} more problems)" if more > 0 else ""))


def _describe(line: int | None, message: str) -> str:
    return message if line is None else f"line {line}: {message}"


@dataclass(frozen=True, slots=True)
class TrainingExample:
    line: int
    """The example's line in the file (1-based), for messages about it."""
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    """Per token: the token id where the model is trained to produce it, IGNORE_INDEX elsewhere."""

    @property
    def num_trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True, slots=True)
class TrainingSet:
    examples: tuple[TrainingExample, ...]

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        """Every token of every example: what one epoch reads, and what is billed per epoch."""
        return sum(len(example.input_ids) for example in self.examples)


def parse_chat_jsonl(
    data: bytes,
    tokenizer: Any,
    max_tokens_per_example: int,
    min_examples: int = MIN_EXAMPLES,
    *,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> TrainingSet:
    """Validate and tokenize a chat fine-tuning file with the base model's tokenizer and chat template.

    Raises TrainingDataError listing the problems found (every line is checked before giving up).
    `max_tokens_per_example` is the model's context: a longer example could never be trained whole.
    """
    if len(data) > max_file_bytes:
        raise TrainingDataError(
            [(None, f"the file is {len(data):,} bytes, larger than the limit of {max_file_bytes:,} bytes")]
        )
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingDataError([(None, "the base model has no chat template, so it cannot learn chat")])
    problems: list[tuple[int | None, str]] = []
    examples: list[TrainingExample] = []
    lines = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines (e.g. the file's final newline) hold no example
        lines += 1
        messages, line_problems = _parse_line(raw, number)
        if not line_problems:
            example, problem = _tokenize(tokenizer, messages, number, max_tokens_per_example)
            if problem is not None:
                line_problems.append(problem)
            else:
                examples.append(example)
        problems.extend((number, message) for message in line_problems)
    if lines < min_examples:
        problems.append((None, f"the file has {lines} examples; training needs at least {min_examples}"))
    if problems:
        raise TrainingDataError(problems)
    return TrainingSet(examples=tuple(examples))


def _parse_line(raw: bytes, number: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The line's messages (as dicts of role, text and weight) and its problems."""
    try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return [], [f"not valid UTF-8 (byte {exc.start + 1})"]
    try:
        value = json.loads(text)
    except ValueError as exc:
        return [], [f"not valid JSON ({exc})"]
    if not isinstance(value, dict):
        return [], [f'must be a JSON object with a "messages" array, got {_json_type(value)}']
    if "messages" not in value:
        legacy = (
            " (prompt/completion pairs are the legacy format: write each as a user and an assistant message)"
        )
        return [], ['missing "messages"' + (legacy if "prompt" in value else "")]
    problems = []
    for key in value:
        if key in _UNSUPPORTED_EXAMPLE_FIELDS:
            problems.append(f'"{key}": {_TOOLS_UNSUPPORTED}')
        elif key != "messages":
            problems.append(f'unknown field "{key}"; an example holds only "messages"')
    raw_messages = value["messages"]
    if not isinstance(raw_messages, list):
        return [], [*problems, f'"messages" must be an array, got {_json_type(raw_messages)}']
    if not raw_messages:
        return [], [*problems, '"messages" is empty']
    messages = []
    for i, message in enumerate(raw_messages):
        parsed = _parse_message(message, f"messages[{i}]", problems)
        if parsed is not None:
            messages.append(parsed)
    if problems:
        return [], problems
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        problems.append("no assistant message: an example needs an assistant reply to learn from")
    elif not any(m["weight"] for m in assistants):
        problems.append("every assistant message has weight 0: there is nothing to learn from")
    return messages, problems


def _parse_message(message: Any, where: str, problems: list[str]) -> dict[str, Any] | None:
    if not isinstance(message, dict):
        problems.append(f"{where} must be an object, got {_json_type(message)}")
        return None
    start = len(problems)
    for key in message:
        if key in _UNSUPPORTED_MESSAGE_FIELDS:
            problems.append(f"{where}.{key}: {_TOOLS_UNSUPPORTED}")
        elif key not in _MESSAGE_FIELDS:
            problems.append(f'{where}: unknown field "{key}"')
    if len(problems) > start:
        return None  # its other fields may be shaped for what it is (e.g. no content beside tool_calls)
    role = message.get("role")
    if role in ("tool", "function"):
        problems.append(f"{where}.role: {role!r} messages are not supported: {_TOOLS_UNSUPPORTED}")
    elif role not in _ROLES:
        problems.append(f"{where}.role must be one of {', '.join(_ROLES)}")
    if "name" in message and not isinstance(message["name"], str):
        problems.append(f"{where}.name must be a string")
    weight = message.get("weight", 1)
    if "weight" in message and role != "assistant":
        problems.append(f"{where}.weight: only assistant messages have a weight")
    elif type(weight) is not int or weight not in (0, 1):
        problems.append(f"{where}.weight must be 0 or 1")
    text = _content_text(message.get("content"), where, problems, "content" in message)
    if len(problems) > start:
        return None
    return {"role": role, "content": text, "weight": weight}


def _content_text(content: Any, where: str, problems: list[str], present: bool) -> str:
    """The message's text; list content is joined with newlines, as the server joins text parts."""
    if isinstance(content, str):
        return content
    if not present or content is None:
        problems.append(f"{where}.content is required")
        return ""
    if not isinstance(content, list):
        problems.append(f"{where}.content must be a string or an array of text parts")
        return ""
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else _json_type(part)
            problems.append(f"{where}.content[{j}]: only text parts are supported, got {kind!r}")
            continue
        texts.append(part["text"])
    return "\n".join(texts)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """The token ids the server feeds the model for a chat request of `messages` (role and content dicts):
    the chat template with the assistant's generation prompt, encoded without extra special tokens (the
    template holds them). Must stay equal to `tokenmill.serving.prompts.render_chat` (a test checks it)."""
    return list(tokenizer.encode(_render(tokenizer, messages, True), add_special_tokens=False))


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=generation_prompt
    )


def _tokenize(
    tokenizer: Any, messages: list[dict[str, Any]], number: int, max_tokens: int
) -> tuple[TrainingExample | None, str | None]:
    """One example's ids and labels, built turn by turn: before each trained assistant turn the ids are exactly
    the server's prompt for the conversation so far, then come the turn's own tokens, labelled.

    Messages after the last trained turn teach nothing and are left out. If re-rendering the history
    tokenizes an earlier reply differently (BPE merges across the boundary after the generation prompt, e.g.
    a reply starting with spaces), the prompt wins and that reply's tokens past the first difference are not
    trained in this example."""
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["weight"]]
    ids: list[int] = []
    labels: list[int] = []
    try:
        for i in trained:
            prompt_text = _render(tokenizer, messages[:i], True)
            prompt = list(tokenizer.encode(prompt_text, add_special_tokens=False))
            completion = _completion_ids(tokenizer, messages[: i + 1], prompt_text)
            if completion is None:
                return None, (
                    "the base model's chat template does not render this conversation turn by turn "
                    f"(messages[{i}]), so its replies cannot be located for training"
                )
            same = _common_prefix(ids, prompt)
            labels = labels[:same] + [IGNORE_INDEX] * (len(prompt) - same)
            ids = prompt + completion
            labels += completion
    except jinja2.TemplateError as exc:  # templates raise on e.g. roles that do not alternate
        return None, f"the base model's chat template rejected the messages: {exc}"
    if len(ids) > max_tokens:
        return None, (
            f"the example is {len(ids)} tokens long, more than the model's context of {max_tokens} tokens"
        )
    return TrainingExample(line=number, input_ids=tuple(ids), labels=tuple(labels)), None


def _completion_ids(tokenizer: Any, messages: list[dict[str, Any]], prompt_text: str) -> list[int] | None:
    """What the model must generate for the last of `messages` (a reply) after `prompt_text`, the rendering of
    the messages before it with the generation prompt: the template's rendering of the reply up to and
    including the end-of-sequence token that ends it (text after it, such as ChatML's newline, belongs to the
    next prompt). None when the template does not render the conversation as prompt + reply."""
    full_text = _render(tokenizer, messages, False)
    if not full_text.startswith(prompt_text):
        return None
    turn = full_text[len(prompt_text) :]
    content = messages[-1]["content"]
    found = turn.find(content) if content else -1
    search_from = found + len(content) if found >= 0 else 0
    eos = getattr(tokenizer, "eos_token", None)
    end = turn.find(eos, search_from) if eos else -1
    if end >= 0:
        turn = turn[: end + len(eos)]
    return list(tokenizer.encode(turn, add_special_tokens=False))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
