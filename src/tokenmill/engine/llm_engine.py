"""The synchronous engine: step() = schedule -> execute -> sample -> update; and `LLM`, its batch front end."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence as Seq

import torch
from transformers import PreTrainedTokenizerBase

from tokenmill.config import BatchBudget, EngineConfig
from tokenmill.engine.block_pool import BlockPool
from tokenmill.engine.client import EngineStats
from tokenmill.engine.guidance import GuidedDecoder
from tokenmill.engine.lora import LoRARequest, LoRASlots
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.request import RequestOutput, RequestStatus, Sequence
from tokenmill.engine.sampler import Sampler, SamplingRow
from tokenmill.engine.sampling_params import Guidance, InvalidRequestError, SamplingParams
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.setup import LoadedModel, load_model
from tokenmill.engine.step_costs import StepCosts
from tokenmill.models.attention import kv_window

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        loaded: LoadedModel = load_model(config)
        self.config = config
        self.model_id = loaded.model_id
        self.tokenizer = loaded.tokenizer
        plan = loaded.plan
        self.max_model_len = plan.max_model_len
        self.vocab_size = loaded.vocab_size
        self.pool = BlockPool(plan.num_blocks, plan.block_size, config.cache.enable_prefix_caching)
        # Adapters are served on the Llama family's fused layers (models/lora_layers.py) only.
        self.loras = (
            LoRASlots(loaded.model, config.max_loras, config.max_lora_rank, plan.dtype, plan.device)
            if getattr(loaded.model, "supports_lora", False)
            else None
        )
        self.runner = ModelRunner(
            loaded.model, plan.num_blocks, plan.block_size, plan.dtype, plan.device, self.loras
        )
        self.step_costs = StepCosts()
        """What its steps cost by size: the scheduler fits batch work beside live work by it."""
        self.scheduler = Scheduler(
            self.pool,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_model_len=self.max_model_len,
            sliding_window=kv_window(loaded.model.cache_layout),
            eos_token_ids=loaded.eos_token_ids,
            loras=self.loras,
            batch_budget=config.scheduler.batch_budget,
            step_costs=self.step_costs,
            target_tpot_s=config.scheduler.target_tpot_ms / 1000 or None,
        )
        self.sampler = Sampler(
            self.vocab_size, loaded.eos_token_ids, seed=config.model.seed, device=plan.device
        )
        self.guided = GuidedDecoder(self.tokenizer, self.vocab_size, loaded.eos_token_ids, plan.device)
        self.outputs = OutputProcessor(self.tokenizer)
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        logger.info("engine ready: %s, %s", self.model_id, plan.describe())

    # -- requests ----------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Prompt text or token ids -> validated token ids."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequestError(
                f"prompt: token ids must be integers in [0, {self.vocab_size})", param="prompt"
            )
        return list(prompt)

    def check_guidance(self, guidance: Guidance) -> None:
        """Compiles (and caches) the grammar; raises InvalidRequestError (code invalid_grammar, naming
        guidance.param) for an invalid JSON schema, an unsupported schema feature or a bad regex.
        Thread-safe: the HTTP layer calls it from a worker thread while the engine thread runs."""
        self.guided.check(guidance)

    def check_lora(self, lora: LoRARequest) -> None:
        """Validates (and caches) a LoRA adapter against the base model without loading its weights; raises
        InvalidRequestError(param="model") for one this engine cannot serve. Thread-safe."""
        if self.loras is None:
            architecture = type(self.runner.model).__name__
            raise InvalidRequestError(
                f"model: LoRA adapters are not supported on {architecture} models yet", param="model"
            )
        self.loras.check(lora)

    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Everything that can refuse a request, checked before any of it is queued."""
        self.scheduler.check_fits(num_prompt_tokens, params.max_tokens)
        if params.guidance is not None:
            self.check_guidance(params.guidance)
        if params.lora is not None:
            self.check_lora(params.lora)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        stream: bool = False,
    ) -> None:
        """Validate and queue; raises InvalidRequestError (naming the field) before anything is queued."""
        if request_id in self.outputs.groups:
            raise InvalidRequestError(f"request_id: {request_id!r} is already running", param="request_id")
        self.check_request(len(prompt_token_ids), params)
        seqs = [
            Sequence(
                seq_id=request_id if params.n == 1 else f"{request_id}#{i}",
                group_id=request_id,
                index=i,
                token_ids=list(prompt_token_ids),
                num_prompt_tokens=len(prompt_token_ids),
                params=params,
            )
            for i in range(params.n)
        ]
        if params.guidance is not None:
            for seq in seqs:
                self.guided.start(seq.seq_id, params.guidance)
        self.outputs.add(request_id, prompt, seqs, stream)
        for seq in seqs:
            self.scheduler.add(seq)
        self.num_prompt_tokens += len(prompt_token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        group = self.outputs.groups.get(request_id)
        if group is None:
            return None
        for seq in self.scheduler.abort(seq.seq_id for seq in group.seqs):
            self._free(seq)
        return self.outputs.abort(request_id)

    def set_batch_budget(self, budget: BatchBudget) -> None:
        """Change how much of each step batch work may take (an off-peak window widens it). Safe from another
        thread: one reference store (atomic in CPython) of a frozen value, which the scheduler reads once
        per step, so it takes effect from the next step."""
        self.scheduler.batch_budget = budget

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- the loop ----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits = self.runner.execute(batch)
        seqs = [item.seq for item in batch.sampling_items]
        seq_ids = [seq.seq_id for seq in seqs]
        # Only constrained rows cost anything: their masks in one batched call, then one token each.
        grammar = self.guided.masks(enumerate(seq_ids)) if self.guided.active else None
        samples = self.sampler(logits, [_row(seq) for seq in seqs], grammar)
        for seq, (_, logprob) in zip(seqs, samples, strict=True):
            if logprob is not None:
                seq.logprobs.append(logprob)
        token_ids = [token_id for token_id, _ in samples]
        complete = set()
        if grammar is not None:
            complete = self.guided.advance(zip(seq_ids, token_ids, strict=True))
        appended = self.scheduler.update(batch, token_ids, complete)
        self.num_generated_tokens += len(appended)
        outputs = self.outputs.process(appended, self._stop)
        for seq in appended:
            if seq.finished:
                self._free(seq)
        # The whole step, as a stream sees it between two of its tokens: the TPOT target is held to this.
        self.step_costs.observe(batch.num_tokens, time.perf_counter() - started)
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running_seqs=len(self.scheduler.running),
            num_waiting_seqs=len(self.scheduler.waiting),
            num_total_blocks=self.pool.num_blocks,
            num_free_blocks=self.pool.num_free_blocks,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_prompt_tokens=self.scheduler.num_cached_prompt_tokens,
            num_generated_tokens=self.num_generated_tokens,
            num_batch_running_seqs=len(self.scheduler.running.batch),
            num_batch_waiting_seqs=len(self.scheduler.waiting.batch),
            num_batch_tokens=self.scheduler.num_batch_tokens,
            num_interactive_tokens=self.scheduler.num_interactive_tokens,
            num_batch_preemptions=self.scheduler.num_batch_preemptions,
            target_tpot_s=0.0 if self.scheduler.pacer is None else self.scheduler.pacer.target_s,
            num_tpot_limited_steps=self.scheduler.num_tpot_limited_steps,
        )

    # -- internals ---------------------------------------------------------------------------------

    def _free(self, seq: Sequence) -> None:
        """Drop a finished sequence's per-sequence state (random generator, grammar matcher)."""
        self.sampler.free(seq.seq_id)
        self.guided.free(seq.seq_id)

    def _stop(self, seq: Sequence, stop_string: str) -> None:
        self.scheduler.finish(seq, RequestStatus.FINISHED_STOPPED, stop_string)


def _row(seq: Sequence) -> SamplingRow:
    return SamplingRow(seq.seq_id, seq.params, seq.token_ids, seq.num_prompt_tokens, seq.index)


class LLM:
    """Offline batch generation:

    llm = LLM(model="path/to/hf_dir", dtype="float32")
    outs = llm.generate(["Hello", "你好"], SamplingParams(temperature=0.0, max_tokens=32))
    """

    def __init__(self, model: str | None = None, **engine_kwargs: object) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Seq[str] | Seq[int] | Seq[Seq[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order. All prompts are validated
        before any is queued, so one bad prompt leaves nothing half-submitted."""
        prompt_list = _as_prompt_list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        params_list = [params] * len(prompt_list) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompt_list):
            raise InvalidRequestError("sampling_params: need one per prompt", param="sampling_params")
        encoded = [self.engine.encode(prompt) for prompt in prompt_list]
        for prompt_ids, p in zip(encoded, params_list, strict=True):
            self.engine.check_request(len(prompt_ids), p)
        request_ids = [f"gen-{next(self._ids)}" for _ in prompt_list]
        for request_id, prompt, prompt_ids, p in zip(
            request_ids, prompt_list, encoded, params_list, strict=True
        ):
            self.engine.add_request(request_id, prompt_ids, p, prompt if isinstance(prompt, str) else None)
        finished: dict[str, RequestOutput] = {}
        with torch.inference_mode():
            while self.engine.has_unfinished:
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
        return [finished[request_id] for request_id in request_ids]


def _as_prompt_list(prompts: object) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)  # type: ignore[call-overload]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single token-id prompt
    return [p if isinstance(p, str) else list(p) for p in prompts]
