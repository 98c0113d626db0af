"""The one place where exceptions become HTTP responses in OpenAI's error shape:
`{"error": {"message", "type", "param", "code"}}`. Routes raise; they never build error bodies."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.catalog.fleet_model import ModelUnavailable
from tokenmill.catalog.router import ModelOverloaded
from tokenmill.engine.client import EngineError
from tokenmill.engine.sampling_params import InvalidRequestError
from tokenmill.platform.errors import (
    AuthenticationError,
    Conflict,
    EmailTaken,
    FileContentMissing,
    InsufficientQuota,
    InvalidCredentials,
    InviteInvalid,
    ListingRetired,
    LoginThrottled,
    ModelNotAllowed,
    ModelNotFound,
    NotFound,
    OrganizationTaken,
    PermissionDenied,
    PlatformError,
    SignupClosed,
    UploadTooLarge,
)
from tokenmill.platform.ratelimit import RateLimited
from tokenmill.text import printable

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    410: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# pydantic puts the name of the union member that failed into `loc` ("str", "list[int]"): not a field name.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")
# Platform messages start with the field they are about: "amount_micros: must be positive",
# "allowed_models[1]: must not be empty".
_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*(?:\[\d+\]|\.[a-z0-9_]+)*): ")
_PARAMETER_SOURCES = frozenset({"body", "query", "path", "header"})


class APIError(Exception):
    """An error the client should see as-is; `param` names the offending request field."""

    def __init__(
        self, status_code: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code


class ClientDisconnected(Exception):
    """The client went away before the response was ready; nobody is left to read an answer."""


def model_not_found(model: str) -> APIError:
    """The platform's `ModelNotFound` message, so no response tells an unknown model from a hidden one."""
    return APIError(404, str(ModelNotFound(model)), param="model", code="model_not_found")


def error_response(
    status_code: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    *,
    error_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if error_type is None:
        error_type = _ERROR_TYPES.get(
            status_code, "server_error" if status_code >= 500 else "invalid_request_error"
        )
    # An error about bad input may quote it: it must never be the reason the error itself cannot be sent.
    param = None if param is None else printable(param)
    body = {"error": {"message": printable(message), "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status_code, headers=headers)


def platform_error_response(exc: PlatformError) -> JSONResponse:
    """Each platform error family -> the status and code OpenAI uses for it. Every authentication failure
    gets the same body, so a response never tells whether a key exists, was revoked or expired."""
    if isinstance(exc, AuthenticationError):
        return error_response(
            401, exc.public_message, code="invalid_api_key", headers={"www-authenticate": "Bearer"}
        )
    if isinstance(exc, InvalidCredentials):
        return error_response(401, exc.public_message, code="invalid_credentials")
    if isinstance(exc, LoginThrottled):
        headers = {"retry-after": str(exc.retry_after_s)}
        return error_response(429, str(exc), code="too_many_login_attempts", headers=headers)
    if isinstance(exc, RateLimited):
        if exc.decision.reason == "request_too_large":
            # More tokens than the key may use in any minute: no wait helps, so not a 429 (which clients
            # retry), but a 400 like any other request that can never be served.
            return error_response(400, str(exc), code="request_too_large", headers=exc.decision.headers())
        return error_response(429, str(exc), code="rate_limit_exceeded", headers=exc.decision.headers())
    if isinstance(exc, InsufficientQuota):
        # No Retry-After: waiting does not help, a top-up does.
        return error_response(429, str(exc), code="insufficient_quota", error_type="insufficient_quota")
    field_match = _FIELD_PREFIX.match(str(exc))
    param = field_match.group(1) if field_match else None
    message = str(exc)[field_match.end() :] if field_match else str(exc)
    message = message[:1].upper() + message[1:]
    if isinstance(exc, ModelNotFound):
        return error_response(404, str(exc), "model", "model_not_found")
    if isinstance(exc, ListingRetired):
        return error_response(410, str(exc), "model", "model_retired")
    if isinstance(exc, UploadTooLarge):
        code = "file_too_large" if exc.limit == "file" else "storage_quota_exceeded"
        return error_response(413, message, param, code)
    if isinstance(exc, FileContentMissing):
        return error_response(410, message, param, "file_content_missing")
    if isinstance(exc, ModelNotAllowed):
        return error_response(
            403, f"This API key may not use the model `{exc.model}`.", "model", "model_not_allowed"
        )
    if isinstance(exc, SignupClosed | InviteInvalid):
        param = "invite_code" if isinstance(exc, InviteInvalid) else None
        return error_response(403, str(exc), param, "signup_closed" if param is None else "invite_invalid")
    if isinstance(exc, PermissionDenied):
        return error_response(403, message, param, "permission_denied")
    if isinstance(exc, NotFound):
        return error_response(404, message, param, "not_found")
    if isinstance(exc, EmailTaken | OrganizationTaken):
        code = "email_taken" if isinstance(exc, EmailTaken) else "organization_taken"
        return error_response(409, message, param, code)
    if isinstance(exc, Conflict):
        return error_response(409, message, param, "conflict")
    return error_response(400, message, param)


ENGINE_FAILED_RETRY_AFTER_S = 1
ENGINE_FAILED = (
    "The model's engine stopped while serving the request (its replica is restarting); nothing is charged "
    f"for it. Retry in {ENGINE_FAILED_RETRY_AFTER_S} s."
)


def error_payload(exc: BaseException) -> dict[str, Any]:
    """The error object for an SSE `data:` event, sent when a stream fails after its headers went out."""
    if isinstance(exc, EngineError):
        return {
            "error": {
                "message": ENGINE_FAILED,
                "type": "server_error",
                "param": None,
                "code": "engine_failed",
            }
        }
    if isinstance(exc, APIError | InvalidRequestError):
        status = exc.status_code if isinstance(exc, APIError) else 400
        error_type = _ERROR_TYPES.get(status, "server_error")
        return {"error": {"message": exc.message, "type": error_type, "param": exc.param, "code": exc.code}}
    return {
        "error": {
            "message": "The server had an error while generating the response.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


def internal_error_response(request_id: str) -> JSONResponse:
    """No exception text or trace reaches the client; the request id links the report to the server log."""
    return error_response(
        500,
        f"The server had an error while processing your request (request id {request_id}). "
        "Retry, or report the request id if the error persists.",
    )


def request_too_large_response(limit_bytes: int) -> JSONResponse:
    return error_response(
        413,
        f"The request body is larger than the server's limit of {limit_bytes} bytes.",
        code="request_too_large",
    )


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [p for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p))]
    if parts and parts[0] in _PARAMETER_SOURCES:
        parts = parts[1:]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def validation_error(errors: Sequence[Any]) -> tuple[str, str | None]:
    """(message, param) of pydantic's first error, worded for the caller."""
    if not errors:
        return "The request is invalid.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: it is not valid JSON.", None
    param = _param_from_loc(tuple(first.get("loc", ())))
    if param is None:
        return "The request body must be a JSON object.", None
    return f"Invalid value for '{param}': {first.get('msg', 'invalid value')}.", param


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    message, param = validation_error(list(exc.errors()))
    return error_response(400, message, param=param)


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc.status_code, exc.message, exc.param, exc.code)


async def _invalid_request(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidRequestError)
    return error_response(400, exc.message, exc.param, exc.code)


async def _platform_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PlatformError)
    if isinstance(exc, AuthenticationError):  # which failure it was stays in the log, never in the response
        logger.info("request %s: 401 (%s)", getattr(request.state, "request_id", "?"), type(exc).__name__)
    return platform_error_response(exc)


async def _model_overloaded(_: Request, exc: Exception) -> Response:
    """Refused at once, before anything is reserved or charged: a queue that is full now is better
    answered with a retry hint than with a request that times out."""
    assert isinstance(exc, ModelOverloaded)
    return error_response(
        503, str(exc), "model", "model_overloaded", headers={"retry-after": str(exc.retry_after_s)}
    )


async def _model_unavailable(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ModelUnavailable)
    headers = None if exc.retry_after_s is None else {"retry-after": str(exc.retry_after_s)}
    return error_response(503, str(exc), "model", "model_unavailable", headers=headers)


async def _engine_failed(_: Request, exc: Exception) -> Response:
    """A replica died under the request (a worker process killed or crashed): the others keep serving."""
    return error_response(
        503, ENGINE_FAILED, None, "engine_failed", headers={"retry-after": str(ENGINE_FAILED_RETRY_AFTER_S)}
    )


async def _request_validation(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return _validation_response(exc)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(404, f"Invalid URL ({request.method} {request.url.path}).", code="unknown_url")
    if exc.status_code == 405:
        return error_response(405, f"Method {request.method} is not allowed on {request.url.path}.")
    return error_response(exc.status_code, str(exc.detail))


async def _client_disconnected(request: Request, _: Exception) -> Response:
    logger.info("request %s: client disconnected, request aborted", getattr(request.state, "request_id", "?"))
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
    APIError: _api_error,
    InvalidRequestError: _invalid_request,
    PlatformError: _platform_error,
    ModelOverloaded: _model_overloaded,
    ModelUnavailable: _model_unavailable,
    EngineError: _engine_failed,
    RequestValidationError: _request_validation,
    StarletteHTTPException: _http_exception,
    ClientDisconnected: _client_disconnected,
}


def install_error_handlers(app: FastAPI) -> None:
    """Unexpected exceptions are not handled here but in `middleware.RequestContext`, so that the 500 they
    become still carries the request id header."""
    for exc_type, handler in _HANDLERS.items():
        app.add_exception_handler(exc_type, handler)


async def handled_response(request: Request, exc: Exception) -> Response | None:
    """The response the app's handlers give `exc`, for a route run outside HTTP (a batch line); None for an
    unexpected exception (a 500, which must not show its text)."""
    for exc_type in type(exc).__mro__:
        handler = _HANDLERS.get(exc_type)
        if handler is not None:
            return await handler(request, exc)
    return None
