"""The OpenAPI schema tells the truth, so client generators, API explorers and the fuzzer in the suite can rely
on it: each route documents its success body (JSON, and Server-Sent Events where it streams) and every error
status it can answer with, all in OpenAI's error shape; FastAPI's automatic 422, which this API never sends
(validation errors are 400s), is taken out; the /v1 routes declare their security: a bearer key or the
console's session cookie, unless the route declares its own (the sign-in routes, which need neither)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tokenmill.serving.deps import SESSION_COOKIE
from tokenmill.serving.protocol import ChatCompletionChunk, Completion, ErrorResponse

ERROR_STATUSES: dict[int, str] = {
    400: "The request is invalid; `param` names the field.",
    401: "No valid API key: missing, malformed, unknown, revoked or expired (or, signing in, a wrong email "
    "or password: `invalid_credentials`).",
    403: "The API key may not do this (a model outside its allow-list, a grant it does not hold), or a "
    "session cookie came without its X-CSRF-Token (`csrf_failed`).",
    404: "No such model (or none this key may see), or no such object.",
    409: "The change contradicts an existing row (a duplicate name, an idempotency key reused for "
    "another amount); the message says which.",
    410: "The caller's own organization retired this model (`model_retired`), or a file's content is "
    "missing from storage (`file_content_missing`).",
    413: "The request body is larger than the server accepts, or an upload is larger than the per-file "
    "limit (`file_too_large`) or the organization's storage quota (`storage_quota_exceeded`).",
    429: "A rate limit (`rate_limit_exceeded`, with Retry-After) or the balance or spend limit "
    "(`insufficient_quota`) refused the request, or too many failed sign-ins (`too_many_login_attempts`, "
    "with Retry-After).",
    500: "The server failed; the message carries the request id to report.",
    503: "The model is loading, stopped, failed or full (`model_overloaded`, with Retry-After); the "
    "message says which.",
}
ALWAYS = (400, 401, 500)
"""What any /v1 route may answer: bad input (also invalid Unicode in a body), no key, a server fault."""
GENERATION = (*ALWAYS, 403, 404, 410, 413, 429, 503)
BEARER = "bearerAuth"
SESSION_COOKIE_SCHEME = "sessionCookie"
KEY_SECURITY = [{BEARER: []}, {SESSION_COOKIE_SCHEME: []}]
"""Either one: the bearer key, or the console's `tm_session` cookie (with X-CSRF-Token on changes)."""
STREAMED: tuple[type[BaseModel], ...] = (ChatCompletionChunk, Completion)
"""The objects SSE events carry; no route returns them as a body, so they are added to the components."""
_COMPONENT = "#/components/schemas/{model}"


def documented(
    body: type[BaseModel] | None,
    *statuses: int,
    stream: type[BaseModel] | None = None,
    success: int = 200,
) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: `body` as its `success` answer (JSON; with `stream`, also
    `text/event-stream` whose events carry `stream` objects), and OpenAI's error body for each of
    `statuses`."""
    responses: dict[int | str, dict[str, Any]] = {}
    if body is not None:
        responses[success] = {"model": body, "description": "Success."}
    if stream is not None:
        responses[success]["content"] = {"text/event-stream": {"schema": _event_schema(stream)}}
    for status in sorted(set(statuses)):
        responses[status] = {"model": ErrorResponse, "description": ERROR_STATUSES[status]}
    return responses


def _event_schema(stream: type[BaseModel]) -> dict[str, Any]:
    """One Server-Sent Event: `data` is a JSON `stream` object, or `[DONE]` at the end."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "description": f"A JSON {stream.__name__}, or `[DONE]` after the last one.",
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": _COMPONENT.format(model=stream.__name__)},
                    },
                ],
            },
        },
    }


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """`app.openapi`: built once, then cached on the app as FastAPI does."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        _, streamed = models_json_schema([(m, "serialization") for m in STREAMED], ref_template=_COMPONENT)
        for name, definition in streamed.get("$defs", {}).items():
            schemas.setdefault(name, definition)
        components["securitySchemes"] = {
            BEARER: {"type": "http", "scheme": "bearer"},
            SESSION_COOKIE_SCHEME: {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
        }
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                if path.startswith("/v1/"):
                    operation.setdefault("security", [dict(option) for option in KEY_SECURITY])
        app.openapi_schema = schema
    return app.openapi_schema
