"""One sequence's state inside the engine, and the outputs the engine hands back to callers.

A request with `n > 1` becomes n sequences that share the prompt (and its KV blocks through the prefix
cache); the engine regroups them into one `RequestOutput`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tokenmill.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """Logprob of one generated token under the model's raw distribution, plus the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class Sequence:
    """The scheduler's unit: one prompt plus one growing output.

    There are no phases: `num_computed_tokens` is how many of `token_ids` have KV in the cache, and each
    step the scheduler closes the gap to `num_tokens` (a prefill chunk, a decode, or a recompute after
    preemption are all the same thing).
    """

    seq_id: str
    group_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    """Hashes of the full blocks of `token_ids` computed so far (the prefix-cache keys)."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at admission."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_reason: str | int | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.status.finished


@dataclass(slots=True)
class CompletionOutput:
    """One sample of a request. While streaming, `text` holds only what is safe to show (no partial
    UTF-8 character, no prefix of a stop string)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """"stop" (EOS, stop token or stop string), "length" (max_tokens), "abort", or None while running."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the sample, if any."""
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache instead of being computed."""
