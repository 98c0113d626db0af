"""The one place where exceptions become HTTP responses in OpenAI's error shape:
`{"error": {"message", "type", "param", "code"}}`. Routes raise; they never build error bodies."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.sampling_params import InvalidRequestError

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# pydantic puts the name of the union member that failed into `loc` ("str", "list[int]"): not a field name.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")


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
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def error_response(
    status_code: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    error_type = _ERROR_TYPES.get(
        status_code, "server_error" if status_code >= 500 else "invalid_request_error"
    )
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status_code)


def error_payload(exc: BaseException) -> dict[str, Any]:
    """The error object for an SSE `data:` event, sent when a stream fails after its headers went out."""
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
    if parts and parts[0] == "body":
        parts = parts[1:]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if not errors:
        return error_response(400, "The request is invalid.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return error_response(400, "We could not parse the JSON body of your request: it is not valid JSON.")
    param = _param_from_loc(tuple(first.get("loc", ())))
    if param is None:
        return error_response(400, "The request body must be a JSON object.")
    message = str(first.get("msg", "invalid value"))
    return error_response(400, f"Invalid value for '{param}': {message}.", param=param)


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc.status_code, exc.message, exc.param, exc.code)


async def _invalid_request(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidRequestError)
    return error_response(400, exc.message, exc.param, exc.code)


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


def install_error_handlers(app: FastAPI) -> None:
    """Unexpected exceptions are not handled here but in `middleware.RequestContext`, so that the 500 they
    become still carries the request id header."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(InvalidRequestError, _invalid_request)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(ClientDisconnected, _client_disconnected)
