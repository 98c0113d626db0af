"""Server-sent events as OpenAI sends them: `data: {json}` events, an error event if the stream fails after
its headers went out, `data: [DONE]` last."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenmill.serving.errors import APIError, error_payload

logger = logging.getLogger(__name__)

DONE_EVENT = "data: [DONE]\n\n"


def sse_event(payload: str) -> str:
    return f"data: {payload}\n\n"


async def sse_stream(events: AsyncGenerator[str, None], request_id: str) -> AsyncGenerator[str, None]:
    """`events` are JSON payloads; ends with [DONE], or with an error event (which the openai SDK raises)."""
    try:
        async with aclosing(events):
            async for payload in events:
                yield sse_event(payload)
    except Exception as exc:
        if isinstance(exc, APIError):
            logger.info("request %s: stream ended with %s", request_id, exc.message)
        else:
            logger.exception("request %s: stream failed", request_id)
        yield sse_event(json.dumps(error_payload(exc)))
        return
    yield DONE_EVENT


class SSEResponse(StreamingResponse):
    """Unlike StreamingResponse under ASGI spec 2.4, always listens for the disconnect: a client that leaves
    while its request waits for a slot (nothing to send yet) must still free the engine at once.
    `on_close` runs however the response ends, synchronously, even if the stream never started."""

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncGenerator[str, None],
        on_close: Callable[[], None],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            content, headers={"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})}
        )
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    async with aclosing(self._content):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self._on_close()
