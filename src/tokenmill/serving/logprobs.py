"""Engine logprobs (token ids) -> OpenAI's two shapes: chat's `content: [{token, logprob, bytes,
top_logprobs}]` and the legacy completions' parallel lists with text offsets."""

from __future__ import annotations

from typing import Any

from tokenmill.engine.request import TokenLogprob
from tokenmill.serving.protocol import CompletionLogprobs, TokenLogprobEntry, TopLogprob

_MIN_LOGPROB = -9999.0  # what OpenAI reports for "impossible"; JSON has no -inf


class TokenTexts:
    """The text of single tokens, cached per tokenizer: logprobs name the same few thousand tokens over and
    over, and decoding one id at a time is the slow part of formatting them."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def _top(token_id: int, logprob: float, texts: TokenTexts) -> TopLogprob:
    text = texts(token_id)
    return TopLogprob(token=text, logprob=max(logprob, _MIN_LOGPROB), bytes=list(text.encode("utf-8")))


def chat_logprobs(entries: list[TokenLogprob], num_top: int, texts: TokenTexts) -> list[TokenLogprobEntry]:
    result = []
    for entry in entries:
        top = [_top(token_id, logprob, texts) for token_id, logprob in entry.top[:num_top]]
        sampled = _top(entry.token_id, entry.logprob, texts)
        result.append(TokenLogprobEntry(**sampled.model_dump(), top_logprobs=top))
    return result


def completion_logprobs(
    entries: list[TokenLogprob], num_top: int, texts: TokenTexts, text_offset: int
) -> CompletionLogprobs:
    """`text_offset`: where the first token's text starts in the choice's text (after an echoed prompt, or
    after what earlier stream chunks carried)."""
    out = CompletionLogprobs()
    for entry in entries:
        token = texts(entry.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(max(entry.logprob, _MIN_LOGPROB))
        # As OpenAI documents: the sampled token is always there, so up to `logprobs + 1` entries.
        top = {texts(token_id): max(logprob, _MIN_LOGPROB) for token_id, logprob in entry.top[:num_top]}
        top.setdefault(token, max(entry.logprob, _MIN_LOGPROB))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out
