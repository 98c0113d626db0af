"""The interface the server talks to: the in-process `AsyncLLM`, or a replica in a worker process
(`cluster.process_engine.ProcessEngine`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tokenmill.config import BatchBudget
from tokenmill.engine.request import RequestOutput
from tokenmill.engine.sampling_params import Guidance, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tokenmill.engine.lora import LoRARequest


class EngineError(RuntimeError):
    """The engine failed while running a request (or its worker process died): the request produced no
    further output."""


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for /metrics and the router: what is running and how full the KV pool is."""

    num_running_seqs: int
    num_waiting_seqs: int
    num_total_blocks: int
    num_free_blocks: int
    """Blocks no running sequence holds (cached-but-unreferenced blocks count as free)."""
    num_prompt_tokens: int
    """Totals since start: prompt tokens admitted, of which served from the prefix cache, generated."""
    num_cached_prompt_tokens: int
    num_generated_tokens: int
    num_batch_running_seqs: int = 0
    """Of the running and waiting sequences, those of batch work (batch-API lines)."""
    num_batch_waiting_seqs: int = 0
    num_batch_tokens: int = 0
    """Totals since start: tokens scheduled for batch and for interactive work (their sum is all the tokens
    computed), and preemptions of batch sequences. Together they show the capacity batch work used."""
    num_interactive_tokens: int = 0
    num_batch_preemptions: int = 0
    target_tpot_s: float = 0.0
    """The time per token decoding streams are kept to (0: throughput mode), and the steps in which it held
    prompt tokens back since start: the policy and how often it acted."""
    num_tpot_limited_steps: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks if self.num_total_blocks else 0.0


class EngineClient(Protocol):
    """Contract:
    - `generate` validates before any work (raises `InvalidRequestError` naming the field) and then yields
      cumulative `RequestOutput` snapshots; the last one has `finished=True`. A batch-priority request may
      yield only that last one.
    - Leaving the iterator early (break, cancellation, client disconnect) aborts the request and frees its
      KV blocks at once; `abort` does the same from outside.
    """

    model_id: str
    max_model_len: int
    tokenizer: PreTrainedTokenizerBase

    @property
    def healthy(self) -> bool:
        """False while it cannot serve (its worker process died and is being restarted): the router sends
        it nothing meanwhile."""
        ...

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raises `InvalidRequestError` (code context_length_exceeded) for a request that could never run to
        completion here; `generate` checks the same, this lets a caller refuse it before anything else."""
        ...

    def check_guidance(self, guidance: Guidance) -> None:
        """Compiles (and caches) the grammar; raises InvalidRequestError(f"{guidance.param}: <reason>",
        param=guidance.param, code="invalid_grammar") for an invalid JSON schema, an unsupported schema
        feature, a bad regex. Thread-safe: the HTTP layer calls it from a worker thread while the engine
        thread runs; `generate` checks the same."""
        ...

    def check_lora(self, lora: LoRARequest) -> None:
        """Validates (and caches) a LoRA adapter against the base model; raises InvalidRequestError(
        f"model: LoRA adapter {name!r}: <reason>", param="model") for a missing directory, a non-LoRA or
        DoRA adapter, a rank above max_lora_rank, an unsupported target module or shapes of another base
        model. Reads files, so call it from a worker thread; `generate` checks the same."""
        ...

    def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def set_batch_budget(self, budget: BatchBudget) -> None:
        """How much of each step batch work may take from the next step on. Thread-safe."""
        ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...
