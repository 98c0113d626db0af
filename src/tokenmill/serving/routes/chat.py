"""POST /v1/chat/completions."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenmill.engine.request import TokenLogprob
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.serving.deltas import ChoiceDelta, DeltaTracker
from tokenmill.serving.deps import PrincipalDep, RequestIdDep, StateDep
from tokenmill.serving.errors import APIError
from tokenmill.serving.generation import EngineRequest, merged
from tokenmill.serving.logprobs import TokenTexts, chat_logprobs
from tokenmill.serving.metrics import RequestTimer
from tokenmill.serving.openapi import GENERATION, documented
from tokenmill.serving.origin import OriginDep
from tokenmill.serving.prompts import render_chat
from tokenmill.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    ResponseFunctionCall,
    ResponseToolCall,
    Usage,
)
from tokenmill.serving.routes.common import (
    admit_and_start,
    assign_replica,
    check_guidance,
    check_room,
    collect_and_release,
    completion_budget,
    include_usage,
    json_response,
    released_on_error,
    response_id,
    streaming_response,
)
from tokenmill.serving.sampling import sampling_params
from tokenmill.serving.tool_parser import CallStart, ContentDelta, ToolCallStream, parse_tool_calls
from tokenmill.serving.tools import new_call_id, tool_use

logger = logging.getLogger(__name__)
router = APIRouter()


def _check_supported(body: ChatCompletionRequest) -> None:
    """Silently ignoring these would return an answer to a question the caller did not ask."""
    if body.functions:
        raise APIError(400, "Legacy function calling is not supported; use tools instead.", param="functions")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")


def _message(text: str, finish_reason: str | None, tools: bool) -> tuple[AssistantMessage, str | None]:
    """The answer as OpenAI shapes it: with tools, the calls are taken out of the text, and a finished
    answer that made calls says "tool_calls" (one cut by max_tokens still says "length")."""
    if not tools:
        return AssistantMessage(content=text), finish_reason
    content, calls = parse_tool_calls(text)
    if not calls:
        return AssistantMessage(content=content or ""), finish_reason
    tool_calls = [
        ResponseToolCall(id=new_call_id(), function=ResponseFunctionCall(name=c.name, arguments=c.arguments))
        for c in calls
    ]
    return AssistantMessage(content=content, tool_calls=tool_calls), _finish_with_calls(finish_reason)


def _finish_with_calls(finish_reason: str | None) -> str | None:
    return "tool_calls" if finish_reason == "stop" else finish_reason


class _Response:
    """What every chunk of one response shares."""

    def __init__(
        self, body: ChatCompletionRequest, texts: TokenTexts, params: SamplingParams, tools: bool
    ) -> None:
        self.id = response_id("chatcmpl")
        self.created = int(time.time())
        self.model = body.model
        self.texts = texts
        self.num_top_logprobs = params.logprobs
        self.include_usage = include_usage(body)
        self.tools = tools
        self._streams: dict[int, ToolCallStream] = {}
        """Per choice, when the answer may be tool calls: the parser its text deltas go through."""
        self._called: set[int] = set()

    def logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        if self.num_top_logprobs is None:
            return None
        return ChatLogprobs(content=chat_logprobs(entries, self.num_top_logprobs, self.texts))

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return chunk.model_dump_json(exclude=None if self.include_usage else {"usage"})

    def delta_chunks(self, delta: ChoiceDelta) -> list[str]:
        if self.tools:
            return self._tool_delta_chunks(delta)
        chunks = []
        if delta.text or delta.logprobs:
            chunks.append(
                self.chunk(
                    [
                        ChatChunkChoice(
                            index=delta.index,
                            delta=Delta(content=delta.text),
                            logprobs=self.logprobs(delta.logprobs),
                        )
                    ]
                )
            )
        if delta.finish_reason is not None:
            chunks.append(
                self.chunk(
                    [ChatChunkChoice(index=delta.index, delta=Delta(), finish_reason=delta.finish_reason)]
                )
            )
        return chunks

    def _tool_delta_chunks(self, delta: ChoiceDelta) -> list[str]:
        """One chunk per parser event, as OpenAI streams calls: the first piece of a call brings its id,
        type and name (arguments ""), the next ones argument fragments. The delta's logprobs ride on its
        first chunk (or on an empty delta when the parser holds all of its text back)."""
        stream = self._streams.setdefault(delta.index, ToolCallStream())
        events = stream.feed(delta.text)
        if delta.finish_reason is not None:
            events += stream.finish()
        deltas = []
        for event in events:
            if isinstance(event, ContentDelta):
                deltas.append(Delta(content=event.text))
                continue
            if isinstance(event, CallStart):
                self._called.add(delta.index)
                piece = DeltaToolCall(
                    index=event.index,
                    id=new_call_id(),
                    type="function",
                    function=DeltaFunctionCall(name=event.name, arguments=""),
                )
            else:
                piece = DeltaToolCall(index=event.index, function=DeltaFunctionCall(arguments=event.fragment))
            deltas.append(Delta(tool_calls=[piece]))
        if not deltas and delta.logprobs:
            deltas.append(Delta())
        chunks = [
            self.chunk(
                [
                    ChatChunkChoice(
                        index=delta.index,
                        delta=piece,
                        logprobs=self.logprobs(delta.logprobs) if n == 0 and delta.logprobs else None,
                    )
                ]
            )
            for n, piece in enumerate(deltas)
        ]
        if delta.finish_reason is not None:
            reason = delta.finish_reason
            if delta.index in self._called:
                reason = _finish_with_calls(reason)
            chunks.append(
                self.chunk([ChatChunkChoice(index=delta.index, delta=Delta(), finish_reason=reason)])
            )
        return chunks


async def _events(
    response: _Response, requests: list[EngineRequest], n: int, tracker: DeltaTracker, timer: RequestTimer
) -> AsyncGenerator[str, None]:
    try:
        for index in range(n):
            yield response.chunk([ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
        async with aclosing(merged(requests)) as outputs:
            async for prompt_index, output in outputs:
                deltas = tracker.update(prompt_index, output)
                timer.on_tokens(max((d.num_new_tokens for d in deltas), default=0))
                for delta in deltas:
                    for chunk in response.delta_chunks(delta):
                        yield chunk
        if response.include_usage:
            yield response.chunk([], usage=tracker.usage())
    except Exception:
        timer.failed()
        raise
    finally:
        timer.finish(tracker.num_prompt_tokens, tracker.num_completion_tokens)


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses=documented(ChatCompletion, *GENERATION, stream=ChatCompletionChunk),
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    request_id: RequestIdDep,
    origin: OriginDep,
) -> Response:
    listing = await state.resolve(body.model, principal)
    _check_supported(body)
    tools = tool_use(body)
    ticket = await state.checkout(listing)
    with released_on_error(ticket):
        check_room(state, ticket, body.n)
        prompt_ids = render_chat(
            ticket.tokenizer, body.messages, body.model, tools.specs if tools is not None else None
        )
        max_tokens = completion_budget(
            state,
            ticket,
            body.max_completion_tokens or body.max_tokens,
            "max_completion_tokens" if body.max_completion_tokens else "max_tokens",
            len(prompt_ids),
            openai_default=None,  # OpenAI's chat runs until the context window is full
        )
        params = sampling_params(
            body,
            max_tokens=max_tokens,
            vocab_size=len(ticket.tokenizer),
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            tools=tools,
            lora=ticket.lora,
            priority=origin.priority,
        )
        engine = assign_replica(
            state, ticket, len(prompt_ids) + params.n * max_tokens, params.n, prompt_ids, body.user
        )
        await check_guidance(engine, params)
        response = _Response(body, state.token_texts(ticket), params, tools=tools is not None)
        requests = [
            EngineRequest(
                engine, prompt_ids, params, response.id, state.spawn, ticket.reroute, ticket.prompt_done
            )
        ]
        tracker, timer = DeltaTracker(body.n), state.metrics.timer(body.model, live=origin.is_live)
        logger.debug(
            "request %s: %s, model %s, n=%d, stream=%s",
            request_id,
            response.id,
            body.model,
            body.n,
            body.stream,
        )
        meter = await admit_and_start(
            state,
            principal,
            request.receive,
            request_id,
            listing,
            requests,
            len(prompt_ids),
            params.n * params.max_tokens,
            origin,
        )
    if body.stream:
        events = _events(response, requests, body.n, tracker, timer)
        return streaming_response(meter, ticket, requests, events, tracker, request_id)
    (final,) = await collect_and_release(meter, ticket, request.receive, requests, tracker, timer)
    choices = []
    for sample in sorted(final.outputs, key=lambda s: s.index):
        message, finish_reason = _message(sample.text, sample.finish_reason, tools is not None)
        choices.append(
            ChatChoice(
                index=sample.index,
                message=message,
                logprobs=response.logprobs(sample.logprobs or []),
                finish_reason=finish_reason,
            )
        )
    return json_response(
        ChatCompletion(
            id=response.id, created=response.created, model=body.model, choices=choices, usage=tracker.usage()
        ),
        headers=meter.headers,
    )
