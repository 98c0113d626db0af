"""The engine streams cumulative snapshots; clients want what changed. This turns snapshots into per-choice
deltas and counts the tokens for `usage` (prompt tokens once per prompt, however many samples share it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.request import RequestOutput, TokenLogprob
from tokenmill.serving.errors import APIError
from tokenmill.serving.protocol import PromptTokensDetails, Usage


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    """The choice's index in the response: prompt index * n + sample index (OpenAI's order)."""
    text: str
    logprobs: list[TokenLogprob]
    num_new_tokens: int
    finish_reason: str | None


@dataclass(slots=True)
class DeltaTracker:
    """Per choice: how much text, how many tokens and logprobs earlier snapshots already delivered."""

    n: int
    _text_len: dict[int, int] = field(default_factory=dict)
    _num_tokens: dict[int, int] = field(default_factory=dict)
    _num_logprobs: dict[int, int] = field(default_factory=dict)
    _prompt_tokens: dict[int, int] = field(default_factory=dict)
    _cached_tokens: dict[int, int] = field(default_factory=dict)
    _finished: set[int] = field(default_factory=set)

    def update(self, prompt_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        self._prompt_tokens[prompt_index] = len(output.prompt_token_ids)
        self._cached_tokens[prompt_index] = output.num_cached_tokens
        deltas = []
        for sample in output.outputs:
            index = prompt_index * self.n + sample.index
            if index in self._finished:
                continue
            start, num_seen = self._text_len.get(index, 0), self._num_tokens.get(index, 0)
            logprobs = sample.logprobs or []
            num_logprobs = self._num_logprobs.get(index, 0)
            self._text_len[index] = len(sample.text)
            self._num_tokens[index] = len(sample.token_ids)
            self._num_logprobs[index] = len(logprobs)
            if sample.finish_reason == "abort":
                raise APIError(
                    503,
                    "The server aborted the request (it may be shutting down); retry.",
                    code="request_aborted",
                )
            if sample.finish_reason is not None:
                self._finished.add(index)
            deltas.append(
                ChoiceDelta(
                    index,
                    sample.text[start:],
                    logprobs[num_logprobs:],
                    len(sample.token_ids) - num_seen,
                    sample.finish_reason,
                )
            )
        return deltas

    @property
    def num_prompt_tokens(self) -> int:
        """Counted once per prompt: n samples share their prompt."""
        return sum(self._prompt_tokens.values())

    @property
    def num_completion_tokens(self) -> int:
        return sum(self._num_tokens.values())

    def token_counts(self) -> tuple[int, int]:
        """(prompt, completion) tokens as the engine reported them so far: what a request is billed."""
        return self.num_prompt_tokens, self.num_completion_tokens

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_completion_tokens,
            total_tokens=self.num_prompt_tokens + self.num_completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self._cached_tokens.values())),
        )
