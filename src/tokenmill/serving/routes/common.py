"""Small pieces the generation routes share."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator

from fastapi.responses import Response
from pydantic import BaseModel
from starlette.types import Receive

from tokenmill.engine.client import EngineClient
from tokenmill.platform.auth import KeyPrincipal
from tokenmill.serving.deltas import DeltaTracker
from tokenmill.serving.errors import APIError
from tokenmill.serving.generation import EngineRequest, close_all, start_requests
from tokenmill.serving.metering import Meter, admit
from tokenmill.serving.protocol import GenerationRequest
from tokenmill.serving.sampling import completion_length
from tokenmill.serving.state import ServingState
from tokenmill.serving.streaming import SSEResponse, sse_stream


def json_response(body: BaseModel, headers: dict[str, str] | None = None, status_code: int = 200) -> Response:
    return Response(
        content=body.model_dump_json(),
        media_type="application/json",
        headers=headers,
        status_code=status_code,
    )


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_budget(
    state: ServingState,
    engine: EngineClient,
    model: str,
    requested: int | None,
    param: str,
    num_prompt_tokens: int,
    *,
    openai_default: int | None,
) -> int:
    """The max_tokens one prompt runs with (`sampling.completion_length`), checked against the engine: a
    request that could never run is a 400 here, before any rate limit or quota is consulted."""
    max_tokens = completion_length(
        requested,
        param,
        state.settings.limits_for(model),
        num_prompt_tokens=num_prompt_tokens,
        max_model_len=engine.max_model_len,
        openai_default=openai_default,
    )
    engine.check_fits(num_prompt_tokens, max_tokens)
    return max_tokens


def include_usage(body: GenerationRequest) -> bool:
    """As OpenAI: `stream_options` without `stream` is a mistake worth telling the caller about."""
    if body.stream_options is not None and not body.stream:
        raise APIError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    return bool(body.stream_options and body.stream_options.include_usage)


async def admit_and_start(
    state: ServingState,
    principal: KeyPrincipal,
    receive: Receive,
    request_id: str,
    model: str,
    requests: list[EngineRequest],
    num_prompt_tokens: int,
    max_completion_tokens: int,
) -> Meter:
    """Reserve the worst case (the prompts plus `max_completion_tokens`), then hand the requests to the
    engine; a submission the engine refuses releases the reservation."""
    meter = await admit(
        state.gateway, state.spawn, principal, model, num_prompt_tokens, max_completion_tokens, request_id
    )
    async with meter.submitting():
        await start_requests(receive, requests)
    return meter


def streaming_response(
    meter: Meter,
    requests: list[EngineRequest],
    events: AsyncGenerator[str, None],
    tracker: DeltaTracker,
    request_id: str,
) -> SSEResponse:
    """SSE for `events`; closing the connection aborts the engine requests and settles what was generated."""

    def on_close() -> None:
        close_all(requests)
        meter.close(tracker.token_counts)

    return SSEResponse(
        sse_stream(meter.stream(events, tracker.token_counts), request_id),
        on_close=on_close,
        headers=meter.headers,
    )
