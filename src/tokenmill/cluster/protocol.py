"""What the gateway and a worker process say to each other: pickled tuples over one duplex connection.

gateway -> worker                                  worker -> gateway
  ("load", EngineConfig, WorkerOptions): first       ("ready", WorkerInfo) or ("failed", error): once
  ("add", request_id, prompt, params)                ("step", [OutputDelta], [(request_id, error)], stats):
  ("abort", request_id)                                 one per loop turn, every request's news together
  ("check", call_id, "guidance" | "lora", arg)       ("reply", call_id, error or None): a check's answer
  ("budget", BatchBudget)                            ("alive",): every second, from a thread of its own
  ("shutdown",)

The classes live here rather than in worker.py because that module runs as `__main__` in the worker, where
anything it defined would pickle under the wrong name."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenmill.engine.client import EngineStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    torch_threads: int | None = None
    """CPU threads for the forward passes; None: torch's default (every core). Replicas sharing a machine
    should split its cores instead of each taking all of them."""
    log_level: int = logging.WARNING
    send_tokenizer: bool = True
    """A restarted worker's gateway already has the tokenizer: 1.5 MB it need not send again."""


@dataclass(frozen=True, slots=True)
class FitLimits:
    """What `Scheduler.check_fits` reads, so that the gateway answers it exactly without a round trip (the
    HTTP layer calls it synchronously on the event loop)."""

    max_model_len: int
    num_blocks: int
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    sliding_window: int | None


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    model_id: str
    fit: FitLimits
    stats: EngineStats
    tokenizer: PreTrainedTokenizerBase | None
    """The worker's own (with any configured chat template): unpickling it takes a fraction of a second,
    loading it again from a GGUF several."""
