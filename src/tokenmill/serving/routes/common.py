"""Small pieces the generation routes share."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager

from fastapi.responses import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive

from tokenmill.catalog.lifecycle import Ticket
from tokenmill.catalog.router import ModelOverloaded
from tokenmill.engine.client import EngineClient
from tokenmill.engine.request import RequestOutput
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.platform.listings import ListingInfo
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.serving.deltas import DeltaTracker
from tokenmill.serving.errors import APIError
from tokenmill.serving.generation import EngineRequest, close_all, collect_outputs, start_requests
from tokenmill.serving.metering import Meter, admit
from tokenmill.serving.metrics import RequestTimer
from tokenmill.serving.origin import Origin
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
    ticket: Ticket,
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
        state.settings.limits_for(ticket.model_id),
        num_prompt_tokens=num_prompt_tokens,
        max_model_len=ticket.max_model_len,
        openai_default=openai_default,
    )
    ticket.check_fits(num_prompt_tokens, max_tokens)
    return max_tokens


@contextmanager
def released_on_error(ticket: Ticket) -> Iterator[None]:
    """Until a response owns the ticket, any way out of the route must give the model back."""
    try:
        yield
    except BaseException:
        ticket.release()
        raise


@contextmanager
def _refusals_counted(state: ServingState, model: str) -> Iterator[None]:
    """A 503 for a full model counts against its availability in the model square."""
    try:
        yield
    except ModelOverloaded:
        state.live.record_refusal(model)
        raise


def check_room(state: ServingState, ticket: Ticket, num_seqs: int) -> None:
    """Refuse a request for a full model before the work of preparing it."""
    with _refusals_counted(state, ticket.model_id):
        ticket.check_room(num_seqs)


def assign_replica(
    state: ServingState,
    ticket: Ticket,
    work_tokens: int,
    num_seqs: int,
    prompt_ids: Sequence[int],
    user: str | None,
) -> EngineClient:
    """The replica holding the prompt's prefix (or the `user`'s session) or with the least outstanding work,
    or a 503 at once."""
    with _refusals_counted(state, ticket.model_id):
        return ticket.assign(work_tokens, num_seqs, prompt_ids, session=user)


async def check_guidance(engine: EngineClient, params: SamplingParams) -> None:
    """A bad JSON schema or regex is a 400 before anything is admitted or charged. Compiling runs off the
    loop: a model's first grammar also indexes its tokenizer (about a second)."""
    if params.guidance is not None:
        await run_in_threadpool(engine.check_guidance, params.guidance)


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
    listing: ListingInfo,
    requests: list[EngineRequest],
    num_prompt_tokens: int,
    max_completion_tokens: int,
    origin: Origin,
) -> Meter:
    """Reserve the worst case (the prompts plus `max_completion_tokens`), then hand the requests to the
    engine; a submission the engine refuses releases the reservation."""
    meter = await admit(
        state.gateway,
        state.spawn,
        principal,
        listing,
        num_prompt_tokens,
        max_completion_tokens,
        request_id,
        origin,
    )
    async with meter.submitting():
        await start_requests(receive, requests)
    return meter


async def collect_and_release(
    meter: Meter,
    ticket: Ticket,
    receive: Receive,
    requests: list[EngineRequest],
    tracker: DeltaTracker,
    timer: RequestTimer,
) -> list[RequestOutput]:
    """A non-streaming response's work: run to the end, settle however it ends, give the model back."""
    try:
        async with meter.running(tracker.token_counts):
            return await collect_outputs(receive, requests, tracker, timer)
    finally:
        ticket.release()


def streaming_response(
    meter: Meter,
    ticket: Ticket,
    requests: list[EngineRequest],
    events: AsyncGenerator[str, None],
    tracker: DeltaTracker,
    request_id: str,
) -> SSEResponse:
    """SSE for `events`; closing the connection aborts the engine requests, settles what was generated and
    gives the model back."""

    def on_close() -> None:
        close_all(requests)
        meter.close(tracker.token_counts)
        ticket.release()

    return SSEResponse(
        sse_stream(meter.stream(events, tracker.token_counts), request_id),
        on_close=on_close,
        headers=meter.headers,
    )
