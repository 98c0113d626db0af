"""A batch's input file, checked before the batch exists: each line must be a JSON object with a unique
`custom_id`, `method` POST, the batch's endpoint as `url`, and a `body` that endpoint accepts. A line that
fails is answered at once with its error (in the batch's error file, charged nothing); a file that is not a
JSONL file at all, is empty, too long, or repeats a `custom_id`, fails the whole batch, every problem named
with its line number."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from tokenmill.platform.batches import LineSpec
from tokenmill.serving.errors import error_response, validation_error
from tokenmill.serving.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from tokenmill.text import first_invalid_in_json

MAX_LINES = 50_000
"""OpenAI's limit per batch."""
MAX_CUSTOM_ID_CHARS = 512
MAX_FILE_ERRORS = 100
"""A file with thousands of bad lines is reported by its first hundred."""
BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}

ModelCheck = Callable[[str], Awaitable[tuple[int, dict[str, Any]] | None]]
"""model -> None if the batch's owner may call it here, else (HTTP status, OpenAI error object)."""


@dataclass(frozen=True, slots=True)
class CheckedInput:
    lines: list[LineSpec]
    file_errors: list[dict[str, Any]]
    """Non-empty: the file is refused as a whole (OpenAI's `errors.data`: code, message, line)."""


def error_object(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object, worded and typed as the API's own errors are."""
    return response_json(error_response(status_code, message, param, code))["error"]


def response_json(response: Response) -> Any:
    """The JSON body of a response a route or an error handler built (never a stream)."""
    return json.loads(bytes(response.body))


def parse_body(endpoint: str, body: dict[str, Any]) -> BaseModel:
    """The line's body as its endpoint's request; raises pydantic's ValidationError."""
    return BODIES[endpoint].model_validate(body)


async def check_input(content: bytes, endpoint: str, check_model: ModelCheck) -> CheckedInput:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _refused("invalid_file", f"The file is not UTF-8 text (byte {exc.start}).", None)
    raw_lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not raw_lines:
        return _refused("empty_file", "The input file has no requests.", None)
    if len(raw_lines) > MAX_LINES:
        return _refused("too_many_lines", f"A batch holds at most {MAX_LINES} requests.", MAX_LINES + 1)
    lines: list[LineSpec] = []
    first_seen: dict[str, int] = {}
    file_errors: list[dict[str, Any]] = []
    models: dict[str, tuple[int, dict[str, Any]] | None] = {}
    for number, raw in raw_lines:
        spec = _check_line(number, raw, endpoint)
        if spec.custom_id is not None:
            if spec.custom_id in first_seen:
                message = f"custom_id {spec.custom_id!r} repeats line {first_seen[spec.custom_id]}: each must be unique."
                file_errors.append(
                    {"code": "duplicate_custom_id", "message": message, "param": "custom_id", "line": number}
                )
            first_seen.setdefault(spec.custom_id, number)
        if spec.error is None and spec.model is not None:
            if spec.model not in models:
                models[spec.model] = await check_model(spec.model)
            refused = models[spec.model]
            if refused is not None:
                spec = LineSpec(number, spec.custom_id, spec.model, error=refused[1], status_code=refused[0])
        lines.append(spec)
    if file_errors:
        return CheckedInput([], file_errors[:MAX_FILE_ERRORS])
    return CheckedInput(lines, [])


def _check_line(number: int, raw: str, endpoint: str) -> LineSpec:
    try:
        item = json.loads(raw)
    except ValueError:
        return _bad(number, None, f"Line {number} is not valid JSON.", None, "invalid_json_line")
    if not isinstance(item, dict):
        return _bad(number, None, f"Line {number} must be a JSON object.", None, "invalid_json_line")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        message = f"Line {number}: custom_id must be a non-empty string of at most {MAX_CUSTOM_ID_CHARS} characters."
        return _bad(number, None, message, "custom_id", "invalid_custom_id")
    if item.get("method") != "POST":
        return _bad(number, custom_id, "The method must be POST.", "method", "invalid_method")
    if item.get("url") != endpoint:
        message = f"The url {str(item.get('url'))[:100]!r} does not match the batch's endpoint {endpoint!r}."
        return _bad(number, custom_id, message, "url", "invalid_url")
    body = item.get("body")
    if not isinstance(body, dict):
        return _bad(number, custom_id, "The body must be a JSON object.", "body", "invalid_body")
    found = first_invalid_in_json(body)
    if found is not None:
        param, reason = found
        return _bad(
            number, custom_id, f"Invalid value for '{param or 'body'}': {reason}.", param, "invalid_unicode"
        )
    try:
        request = parse_body(endpoint, body)
    except ValidationError as exc:
        message, param = validation_error(exc.errors())
        return _bad(number, custom_id, message, param, None)
    if getattr(request, "stream", False):
        return _bad(number, custom_id, "Streaming is not supported in a batch.", "stream", None)
    model = str(body["model"])  # validated as the request's model above
    return LineSpec(number, custom_id, model, body=body)


def _bad(number: int, custom_id: str | None, message: str, param: str | None, code: str | None) -> LineSpec:
    return LineSpec(number, custom_id, error=error_object(400, message, param, code), status_code=400)


def _refused(code: str, message: str, line: int | None) -> CheckedInput:
    return CheckedInput([], [{"code": code, "message": message, "param": None, "line": line}])
