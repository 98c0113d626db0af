"""POST /v1/completions (the legacy text API): several prompts per request, echo, legacy logprobs."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenmill.engine.request import TokenLogprob
from tokenmill.serving.deltas import DeltaTracker
from tokenmill.serving.deps import PrincipalDep, RequestIdDep, StateDep
from tokenmill.serving.errors import APIError
from tokenmill.serving.generation import EngineRequest, merged
from tokenmill.serving.logprobs import TokenTexts, completion_logprobs
from tokenmill.serving.metrics import RequestTimer
from tokenmill.serving.openapi import GENERATION, documented
from tokenmill.serving.origin import OriginDep
from tokenmill.serving.prompts import encode_prompt, prompt_list
from tokenmill.serving.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
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
from tokenmill.serving.settings import OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS

logger = logging.getLogger(__name__)
router = APIRouter()


def _check_supported(body: CompletionRequest) -> None:
    if body.suffix:
        raise APIError(400, "suffix (insertion) is not supported by this server's models.", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of is not supported; use n.", param="best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(
            400, "echo together with logprobs needs prompt logprobs, which are not supported.", param="echo"
        )


class _Response:
    """What every chunk of one response shares, plus per-choice echo prefixes and logprob text offsets."""

    def __init__(self, body: CompletionRequest, texts: TokenTexts, echoes: list[str]) -> None:
        self.id = response_id("cmpl")
        self.created = int(time.time())
        self.model = body.model
        self.texts = texts
        self.num_top_logprobs = body.logprobs
        self.include_usage = include_usage(body)
        self.echoes = echoes
        self._offsets: dict[int, int] = {}

    def logprobs(self, index: int, entries: list[TokenLogprob]) -> CompletionLogprobs | None:
        if self.num_top_logprobs is None:
            return None
        result = completion_logprobs(entries, self.num_top_logprobs, self.texts, self._offsets.get(index, 0))
        self._offsets[index] = self._offsets.get(index, 0) + sum(len(token) for token in result.tokens)
        return result

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        chunk = Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return chunk.model_dump_json(exclude=None if self.include_usage else {"usage"})


async def _events(
    response: _Response, requests: list[EngineRequest], n: int, tracker: DeltaTracker, timer: RequestTimer
) -> AsyncGenerator[str, None]:
    try:
        for index, echo in enumerate(response.echoes):
            if echo:
                yield response.chunk([CompletionChoice(index=index, text=echo)])
        async with aclosing(merged(requests)) as outputs:
            async for prompt_index, output in outputs:
                deltas = tracker.update(prompt_index, output)
                timer.on_tokens(max((d.num_new_tokens for d in deltas), default=0))
                for d in deltas:
                    if d.text or d.logprobs or d.finish_reason is not None:
                        yield response.chunk(
                            [
                                CompletionChoice(
                                    index=d.index,
                                    text=d.text,
                                    logprobs=response.logprobs(d.index, d.logprobs),
                                    finish_reason=d.finish_reason,
                                )
                            ]
                        )
        if response.include_usage:
            yield response.chunk([], usage=tracker.usage())
    except Exception:
        timer.failed()
        raise
    finally:
        timer.finish(tracker.num_prompt_tokens, tracker.num_completion_tokens)


@router.post(
    "/v1/completions", response_model=None, responses=documented(Completion, *GENERATION, stream=Completion)
)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    request_id: RequestIdDep,
    origin: OriginDep,
) -> Response:
    listing = await state.resolve(body.model, principal)
    _check_supported(body)
    prompts = prompt_list(body.prompt, "prompt")
    ticket = await state.checkout(listing)
    with released_on_error(ticket):
        check_room(state, ticket, body.n * len(prompts))
        tokenizer = ticket.tokenizer
        prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
        params = []
        for ids in prompt_ids:
            max_tokens = completion_budget(
                state,
                ticket,
                body.max_tokens,
                "max_tokens",
                len(ids),
                openai_default=OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS,
            )
            params.append(
                sampling_params(
                    body,
                    max_tokens=max_tokens,
                    vocab_size=len(tokenizer),
                    logprobs=body.logprobs,
                    lora=ticket.lora,
                    priority=origin.priority,
                )
            )
        echoes = [
            (p if isinstance(p, str) else str(tokenizer.decode(p))) if body.echo else ""
            for p in prompts
            for _ in range(body.n)
        ]
        num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
        max_completion_tokens = sum(p.n * p.max_tokens for p in params)
        engine = assign_replica(
            state,
            ticket,
            num_prompt_tokens + max_completion_tokens,
            sum(p.n for p in params),
            prompt_ids[0],
            body.user,
        )
        await check_guidance(engine, params[0])  # every prompt's params carry the same guidance
        response = _Response(body, state.token_texts(ticket), echoes)
        requests = [
            EngineRequest(
                engine,
                ids,
                p,
                response.id if len(prompts) == 1 else f"{response.id}-{i}",
                state.spawn,
                ticket.reroute,
                ticket.prompt_done,
            )
            for i, (ids, p) in enumerate(zip(prompt_ids, params, strict=True))
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
            num_prompt_tokens,
            max_completion_tokens,
            origin,
        )
    if body.stream:
        events = _events(response, requests, body.n, tracker, timer)
        return streaming_response(meter, ticket, requests, events, tracker, request_id)
    finals = await collect_and_release(meter, ticket, request.receive, requests, tracker, timer)
    choices = [
        CompletionChoice(
            index=prompt_index * body.n + sample.index,
            text=echoes[prompt_index * body.n + sample.index] + sample.text,
            logprobs=response.logprobs(prompt_index * body.n + sample.index, sample.logprobs or []),
            finish_reason=sample.finish_reason,
        )
        for prompt_index, final in enumerate(finals)
        for sample in sorted(final.outputs, key=lambda s: s.index)
    ]
    return json_response(
        Completion(
            id=response.id, created=response.created, model=body.model, choices=choices, usage=tracker.usage()
        ),
        headers=meter.headers,
    )
