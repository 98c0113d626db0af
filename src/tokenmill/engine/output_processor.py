"""Turns sampled tokens into what callers see: detokenized text, stop strings, and one RequestOutput per
request (its n samples regrouped)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.request import CompletionOutput, RequestOutput, Sequence


@dataclass(slots=True)
class _Group:
    request_id: str
    prompt: str | None
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    stream: bool
    """Emit a snapshot after every step (the async engine) or only the final output (offline `generate`)."""


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.groups: dict[str, _Group] = {}

    def add(self, request_id: str, prompt: str | None, seqs: list[Sequence], stream: bool) -> None:
        detokenizers = [
            IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, seq.params) for seq in seqs
        ]
        self.groups[request_id] = _Group(request_id, prompt, seqs, detokenizers, stream)

    def process(self, appended: list[Sequence], stop: Callable[[Sequence, str], None]) -> list[RequestOutput]:
        """Detokenize each new token; `stop(seq, stop_string)` ends a sequence whose text hit a stop string.
        Returns the outputs to publish."""
        touched: dict[str, _Group] = {}
        for seq in appended:
            group = self.groups[seq.group_id]
            stop_string = group.detokenizers[seq.index].append(seq.token_ids[-1])
            if stop_string is not None and not seq.finished:
                stop(seq, stop_string)
            touched[seq.group_id] = group
        outputs = []
        for group in touched.values():
            finished = all(seq.finished for seq in group.seqs)
            if group.stream or finished:
                outputs.append(self._snapshot(group, finished))
            if finished:
                del self.groups[group.request_id]
        return outputs

    def abort(self, request_id: str) -> RequestOutput | None:
        group = self.groups.pop(request_id, None)
        return self._snapshot(group, True) if group else None

    def _snapshot(self, group: _Group, finished: bool) -> RequestOutput:
        completions = []
        for seq, detokenizer in zip(group.seqs, group.detokenizers, strict=True):
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=detokenizer.finish() if seq.finished else detokenizer.text,
                    token_ids=seq.output_token_ids,
                    finish_reason=seq.status.value if seq.finished else None,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                )
            )
        first = group.seqs[0]
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens,
        )
