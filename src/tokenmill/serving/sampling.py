"""OpenAI sampling fields -> the engine's SamplingParams. OpenAI's ranges are checked by the protocol models;
the engine's own rules by SamplingParams itself, which names the field in its error."""

from __future__ import annotations

from tokenmill.engine.sampling_params import InvalidRequestError, SamplingParams
from tokenmill.serving.protocol import GenerationRequest
from tokenmill.serving.settings import CompletionLimits

_SMALLEST_TOP_P = 1e-8  # OpenAI accepts top_p=0 ("only the most likely token"); the engine wants (0, 1]


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not raw:
        return None
    bias = {}
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias: keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"logit_bias: token id {token_id} is not in [0, {vocab_size})", param="logit_bias"
            )
        bias[token_id] = value
    return bias


def completion_length(
    requested: int | None,
    param: str,
    limits: CompletionLimits,
    *,
    num_prompt_tokens: int,
    max_model_len: int,
    openai_default: int | None,
) -> int:
    """The max_tokens a request runs with: what it asked for, within the model's cap; else the server's
    default, cut to what the context window has left; else OpenAI's (`openai_default`, or None for "until
    the window is full")."""
    cap = limits.max_completion_tokens
    if requested is not None:
        if cap is not None and requested > cap:
            raise InvalidRequestError(
                f"{param}: this model writes at most {cap} tokens per completion; you asked for {requested}.",
                param=param,
            )
        return requested
    room = max(1, max_model_len - num_prompt_tokens)
    if cap is not None:
        room = min(room, cap)
    if limits.default_max_tokens is not None:
        return min(limits.default_max_tokens, room)
    return room if openai_default is None else min(openai_default, room)


def sampling_params(
    request: GenerationRequest, *, max_tokens: int, vocab_size: int, logprobs: int | None
) -> SamplingParams:
    top_p = 1.0 if request.top_p is None else max(request.top_p, _SMALLEST_TOP_P)
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    return SamplingParams(
        n=request.n,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=top_p,
        top_k=request.top_k or 0,
        min_p=request.min_p or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=_logit_bias(request.logit_bias, vocab_size),
        seed=request.seed,
        max_tokens=max_tokens,
        stop=tuple(stop),
        logprobs=logprobs,
    )
