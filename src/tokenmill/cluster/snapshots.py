"""Token snapshots across the worker's connection as deltas. The engine's snapshots are cumulative (the whole prompt,
every token and all the text so far); pickling them each step would cost O(length) per token. The worker
sends what changed since its last message instead, and the gateway keeps the running totals and rebuilds
the same cumulative `RequestOutput` when a reader asks for one."""

from __future__ import annotations

from typing import NamedTuple

from tokenmill.engine.request import CompletionOutput, RequestOutput, TokenLogprob


class SampleDelta(NamedTuple):
    index: int
    new_token_ids: list[int]
    """Token ids only ever grow (a sequence appends; a preempted one keeps its tokens), so new ones suffice."""
    text_kept: int
    """How many characters of the text sent before still stand; `text_added` follows them. The safe-to-show
    text usually only grows, but the last snapshot may settle it differently (held-back characters)."""
    text_added: str
    finish_reason: str | None
    stop_reason: str | int | None
    new_logprobs: list[TokenLogprob] | None
    """None when the request asked for no logprobs."""


class OutputDelta(NamedTuple):
    request_id: str
    prompt_token_ids: list[int] | None
    """With a request's first delta only."""
    num_cached_tokens: int
    finished: bool
    samples: list[SampleDelta]
    """One per sample, in the order of `RequestOutput.outputs`."""


class _Sent:
    """What the gateway already has of one sample."""

    __slots__ = ("num_logprobs", "num_tokens", "text")

    def __init__(self) -> None:
        self.num_tokens = 0
        self.text = ""
        self.num_logprobs = 0


class SnapshotEncoder:
    """Worker side: per running request, how much of each sample has been sent."""

    def __init__(self) -> None:
        self._sent: dict[str, list[_Sent]] = {}

    def encode(self, output: RequestOutput) -> OutputDelta:
        sent = self._sent.get(output.request_id)
        first = sent is None
        if sent is None:
            sent = [_Sent() for _ in output.outputs]
        samples = [_sample_delta(sample, seen) for sample, seen in zip(output.outputs, sent, strict=True)]
        if output.finished:
            self._sent.pop(output.request_id, None)
        else:
            self._sent[output.request_id] = sent
        return OutputDelta(
            output.request_id,
            output.prompt_token_ids if first else None,
            output.num_cached_tokens,
            output.finished,
            samples,
        )

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)


def _sample_delta(sample: CompletionOutput, seen: _Sent) -> SampleDelta:
    new_token_ids = sample.token_ids[seen.num_tokens :]
    text_kept = len(seen.text) if sample.text.startswith(seen.text) else 0
    new_logprobs = None
    if sample.logprobs is not None:
        new_logprobs = sample.logprobs[seen.num_logprobs :]
        seen.num_logprobs = len(sample.logprobs)
    seen.num_tokens = len(sample.token_ids)
    seen.text = sample.text
    return SampleDelta(
        sample.index,
        new_token_ids,
        text_kept,
        sample.text[text_kept:],
        sample.finish_reason,
        sample.stop_reason,
        new_logprobs,
    )


class _Sample:
    __slots__ = ("finish_reason", "index", "logprobs", "stop_reason", "text", "token_ids")

    def __init__(self, index: int) -> None:
        self.index = index
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[TokenLogprob] | None = None


class SnapshotBuilder:
    """Gateway side: one request's totals, fed with its deltas; `snapshot()` is a fresh cumulative output,
    equal to the one the engine made (lists are copied, so a reader may keep a snapshot while more arrive)."""

    def __init__(self, request_id: str, prompt: str | None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids: list[int] = []
        self.num_cached_tokens = 0
        self.finished = False
        self._samples: list[_Sample] = []

    def apply(self, delta: OutputDelta) -> None:
        if delta.prompt_token_ids is not None:
            self.prompt_token_ids = delta.prompt_token_ids
            self._samples = [_Sample(change.index) for change in delta.samples]
        self.num_cached_tokens = delta.num_cached_tokens
        self.finished = delta.finished
        for sample, change in zip(self._samples, delta.samples, strict=True):
            sample.token_ids += change.new_token_ids
            sample.text = sample.text[: change.text_kept] + change.text_added
            sample.finish_reason = change.finish_reason
            sample.stop_reason = change.stop_reason
            if change.new_logprobs is not None:
                if sample.logprobs is None:
                    sample.logprobs = []
                sample.logprobs += change.new_logprobs

    def snapshot(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[
                CompletionOutput(
                    index=s.index,
                    text=s.text,
                    token_ids=list(s.token_ids),
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                )
                for s in self._samples
            ],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
        )
