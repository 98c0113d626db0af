"""The outermost layer of every HTTP request: a request id (logged, and echoed in `x-request-id`), the body
size limit, the request counter, and the last-resort 500 (so even that response carries the id)."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Collection

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.serving.errors import internal_error_response, request_too_large_response
from tokenmill.serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_VALID_INCOMING_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


def _incoming_request_id(scope: Scope) -> str | None:
    """A caller's own id is kept (it ties our log to theirs) when it is short and printable."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            return text if _VALID_INCOMING_ID.match(text) else None
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _endpoint_label(scope: Scope) -> str:
    """The route template, not the raw path: unknown URLs must not create one time series each."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestContext:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        metrics: ServingMetrics,
        streamed: Collection[tuple[str, str]] = (),
    ) -> None:
        """`streamed`: the (method, path) pairs whose body passes through unbuffered and unbounded here (an
        upload route that holds it to its own limits while it streams to disk)."""
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.streamed = frozenset(streamed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            buffered = await self._read_body(scope, receive)
            if buffered is None:
                await request_too_large_response(self.max_body_bytes)(scope, receive, send_with_id)
            else:
                await self.app(scope, buffered, send_with_id)
        except Exception:
            logger.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"))
            if status == 0:
                await internal_error_response(request_id)(scope, receive, send_with_id)
            else:
                status = 500  # headers already went out; the connection is closed mid-response
        finally:
            self.metrics.observe_request(_endpoint_label(scope), status or 500)

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """Reads the whole body (the JSON routes need all of it anyway) and enforces the limit; returns a
        `receive` that replays it and then passes through (so routes still see the disconnect), or None when
        the body is over the limit."""
        if scope.get("method") not in _METHODS_WITH_BODY or (scope["method"], scope["path"]) in self.streamed:
            return receive
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first: Message = message  # disconnected while sending the body
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        return replay
