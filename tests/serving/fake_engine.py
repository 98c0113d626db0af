"""A stand-in EngineClient for the HTTP tests: deterministic replies decoded by a real tokenizer, one token
per step with a small delay, KV blocks accounted as a real engine would (held while running, freed at the
end or on abort), so the API layer's streaming, cancellation and metrics can be checked without a model."""

from __future__ import annotations

import asyncio
import math
import threading
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tokenmill.config import BatchBudget
from tokenmill.engine.client import EngineStats
from tokenmill.engine.request import CompletionOutput, RequestOutput, TokenLogprob
from tokenmill.engine.sampling_params import Guidance, InvalidRequestError, SamplingParams

REPLIES = (
    "The capital of France is Paris.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "A haiku has three lines of five, seven and five syllables.",
    "Octopuses have three hearts and blue blood.",
    "The quick brown fox jumps over the lazy dog, again and again, all day long.",
)


@dataclass
class _Running:
    num_prompt_tokens: int
    outputs: list[list[int]]
    aborted: bool = False
    finished: list[bool] = field(default_factory=list)


class FakeEngine:
    def __init__(
        self,
        tokenizer: Any,
        model_id: str = "fake-chat",
        max_model_len: int = 1024,
        step_delay_s: float = 0.002,
        num_blocks: int = 4096,
        block_size: int = 16,
    ) -> None:
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.step_delay_s = step_delay_s
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.running: dict[str, _Running] = {}
        self.aborted: list[str] = []
        self.submitted: list[tuple[list[int], SamplingParams]] = []
        self.started = False
        self.start_gate: threading.Event | None = None
        """When set, start() waits for it (to observe /ready before the engine is up)."""
        self.healthy = True
        self.fail_at_submit: BaseException | None = None
        """When set, generate() raises it before any output (a worker that died before the first token)."""
        self.fail_with: BaseException | None = None
        """When set, generate() raises it after the first token (a mid-stream engine failure)."""
        self.endless = False
        """When True, replies never reach EOS: only max_tokens (or an abort) ends a request."""
        self._replies = [
            tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id] for text in REPLIES
        ]
        self._num_prompt_tokens = 0
        self._num_generated = 0
        self.batch_budget = BatchBudget()
        """What `set_batch_budget` last set (the fake has no scheduler to apply it to)."""

    async def start(self) -> None:
        while self.start_gate is not None and not self.start_gate.is_set():
            await asyncio.sleep(0.005)
        self.started = True

    async def shutdown(self) -> None:
        self.started = False

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.running[request_id].aborted = True
            self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        used = sum(
            math.ceil((r.num_prompt_tokens + len(out)) / self.block_size)
            for r in self.running.values()
            for out in r.outputs
        )
        return EngineStats(
            num_running_seqs=sum(len(r.outputs) for r in self.running.values()),
            num_waiting_seqs=0,
            num_total_blocks=self.num_blocks,
            num_free_blocks=self.num_blocks - used,
            num_prompt_tokens=self._num_prompt_tokens,
            num_cached_prompt_tokens=0,
            num_generated_tokens=self._num_generated,
        )

    def set_batch_budget(self, budget: BatchBudget) -> None:
        self.batch_budget = budget

    def reply_for(self, prompt_ids: list[int], params: SamplingParams, index: int = 0) -> list[int]:
        """Greedy: one reply per prompt. Sampling: varies with the sample index and the seed."""
        choice = zlib.crc32(bytes(str(prompt_ids), "ascii"))
        if not params.greedy:
            choice += index + (params.seed if params.seed is not None else id(params))
        reply = self._replies[choice % len(self._replies)]
        return reply[:-1] if self.endless else reply

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{num_prompt_tokens} and max_tokens is {max_tokens}.",
                param="messages",
                code="context_length_exceeded",
            )

    def check_guidance(self, guidance: Guidance) -> None:
        """Its canned replies follow no grammar: refusing is the only honest answer."""
        raise InvalidRequestError(
            f"{guidance.param}: the fake engine cannot constrain its output", param=guidance.param
        )

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if not self.started:
            raise RuntimeError("engine not started")
        if self.fail_at_submit is not None:
            raise self.fail_at_submit
        prompt_ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        self.check_fits(len(prompt_ids), params.max_tokens)
        if request_id in self.running:
            raise InvalidRequestError(f"request_id: {request_id!r} is already running", param="request_id")
        self.submitted.append((prompt_ids, params))
        replies = [self.reply_for(prompt_ids, params, i) for i in range(params.n)]
        state = _Running(len(prompt_ids), [[] for _ in range(params.n)], finished=[False] * params.n)
        self.running[request_id] = state
        self._num_prompt_tokens += len(prompt_ids)
        try:
            while True:
                await asyncio.sleep(self.step_delay_s)
                outputs = [self._advance(state, i, replies[i], params) for i in range(params.n)]
                done = all(o.finish_reason is not None for o in outputs)
                yield RequestOutput(
                    request_id,
                    prompt if isinstance(prompt, str) else None,
                    prompt_ids,
                    outputs,
                    finished=done,
                )
                if self.fail_with is not None:
                    raise self.fail_with
                if done:
                    return
        finally:
            del self.running[request_id]

    def _advance(self, state: _Running, i: int, reply: list[int], params: SamplingParams) -> CompletionOutput:
        out = state.outputs[i]
        if state.aborted:
            return CompletionOutput(
                i, self.tokenizer.decode(out, skip_special_tokens=True), list(out), "abort"
            )
        if not state.finished[i]:
            out.append(reply[len(out) % len(reply)])
            self._num_generated += 1
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        finish = None
        if out[-1] == self.tokenizer.eos_token_id:
            finish = "stop"
        for stop in params.stop:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        if finish is None and len(out) >= params.max_tokens:
            finish = "length"
        state.finished[i] = finish is not None
        logprobs = None
        if params.logprobs is not None:
            logprobs = [
                TokenLogprob(t, -0.25, tuple((t + k, -0.25 - k) for k in range(params.logprobs))) for t in out
            ]
        return CompletionOutput(i, text, list(out), finish, logprobs=logprobs)
