"""Continuous batching: each step packs decodes and prefill chunks under a token budget and a sequence cap,
and preempts (recompute later) instead of failing when KV blocks run out. Pure Python, no torch.

There is no prefill or decode phase: a sequence has `num_computed_tokens` of `num_tokens` in the cache and
each step closes part of that gap. A decode is a gap of 1; a chunked prefill is a gap larger than the
budget; a preempted sequence simply restarts from 0 (minus whatever the prefix cache still holds).

Steady streams: a step cannot be interrupted, so every decoding stream waits for the prompt tokens computed
beside it. While interactive streams decode, prompt chunks and admissions get only the tokens that keep the
streams at the TPOT target on average (`step_costs.TpotPacer`, by the engine's measured step costs); without
a target (throughput mode) they get the whole token budget.

Priority classes: interactive work is served first and batch work only gets the capacity left. Beside live
work, batch items get as many tokens as keep the step within `BatchBudget.max_slowdown` of the live work
alone, by the engine's measured step costs (and at most `fill_tokens`); with no live work, a step of up to
`idle_tokens` (a live request arriving meanwhile waits for the step under way). When memory runs short,
batch sequences give it back first.

Sliding-window models give back the blocks that slid out of the window as a sequence advances
(`kv_window.KvWindow`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tokenmill.config import BatchBudget
from tokenmill.engine.batch import ScheduledBatch, ScheduledSeq
from tokenmill.engine.block_pool import NO_BLOCK, BlockHash, BlockPool, hash_block, hash_salt
from tokenmill.engine.kv_window import KvWindow, blocks_for
from tokenmill.engine.priority_queues import RunningSeqs, WaitingQueues, is_batch
from tokenmill.engine.request import RequestStatus, Sequence
from tokenmill.engine.sampling_params import InvalidRequestError
from tokenmill.engine.step_costs import StepCosts, TpotPacer

if TYPE_CHECKING:
    from tokenmill.engine.lora import LoRARequest


class AdapterSlots(Protocol):
    """The LoRA slot cache as the scheduler sees it (`tokenmill.engine.lora.LoRASlots`): an adapter is
    pinned once per running sequence that uses it, and only unpinned adapters may be evicted."""

    def can_pin(self, lora: LoRARequest) -> bool: ...

    def pin(self, lora: LoRARequest) -> None: ...

    def unpin(self, lora: LoRARequest) -> None: ...


class Scheduler:
    def __init__(
        self,
        block_pool: BlockPool,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        sliding_window: int | None = None,
        eos_token_ids: Iterable[int] = (),
        loras: AdapterSlots | None = None,
        batch_budget: BatchBudget | None = None,
        step_costs: StepCosts | None = None,
        target_tpot_s: float | None = None,
    ) -> None:
        self.pool = block_pool
        self.loras = loras
        self.block_size = block_pool.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.window = KvWindow(sliding_window, self.block_size, max_num_batched_tokens)
        """`sliding_window`: the most recent tokens any layer attends to, when every layer has a window
        (models/attention.py `kv_window`); None: sequences keep all their KV."""
        self.eos_token_ids = frozenset(eos_token_ids)
        self.batch_budget = batch_budget or BatchBudget()
        """Another thread may replace it (`LLMEngine.set_batch_budget`): `schedule` reads it once per step."""
        self.step_costs = step_costs
        """Measured by the engine; None (tests of the policy alone): batch work beside live work is bounded
        by `fill_tokens` only."""
        self.pacer = (
            None if target_tpot_s is None or step_costs is None else TpotPacer(target_tpot_s, step_costs)
        )
        """Keeps live decoding streams at the TPOT target by how many prompt tokens each step takes; None: every
        step takes the whole token budget (throughput mode)."""
        self.waiting = WaitingQueues()
        self.running = RunningSeqs()
        self.num_cached_prompt_tokens = 0
        self.num_preemptions = 0
        self.num_batch_preemptions = 0
        self.num_batch_tokens = 0
        self.num_interactive_tokens = 0
        self.num_tpot_limited_steps = 0
        """Steps in which the TPOT target held back prompt tokens that the token budget had room for."""

    # -- admission ---------------------------------------------------------------------------------

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Refuse, before any work, what could never run to completion."""
        if num_prompt_tokens < 1:
            raise InvalidRequestError("prompt: must contain at least one token", param="prompt")
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for "
                "the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens" if num_prompt_tokens < self.max_model_len else "prompt",
                code="context_length_exceeded",
            )
        # The last generated token never needs KV, hence the -1.
        blocks_needed = self.window.peak_blocks(num_prompt_tokens + max_tokens - 1)
        if blocks_needed > self.pool.num_blocks:
            raise InvalidRequestError(
                f"The request needs {blocks_needed} KV-cache blocks but the pool has only "
                f"{self.pool.num_blocks}; reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.num_prompt_tokens, seq.params.max_tokens)
        self.waiting.append(seq)

    def abort(self, seq_ids: Iterable[str]) -> list[Sequence]:
        wanted = set(seq_ids)
        aborted = [s for s in (*self.running, *self.waiting) if s.seq_id in wanted]
        for seq in aborted:
            self._finish(seq, RequestStatus.FINISHED_ABORTED)
        return aborted

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """One step, in this order: running interactive, admitted interactive, running batch (within the
        batch share), admitted batch. Preemption only ever takes from sequences later in that order."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        live = bool(self.running.interactive or self.waiting.interactive)
        budgets = self.batch_budget  # read once: another thread may replace it
        # Running sequences first (oldest first): they hold memory, finishing them frees it. Then admission,
        # but only while no interactive sequence had to give memory back this step (batch ones may have).
        # Prompt tokens (chunks and admissions) take what the live decodes leave of the TPOT target.
        decodes = self._live_decodes() if self.pacer is not None else 0
        chunks = self._prompt_allowance(decodes)
        used, chunked = self._run(self.running.interactive, budget, batch, chunks)
        budget -= used
        if not any(not is_batch(seq) for seq in batch.preempted):
            chunks = min(budget, chunks - chunked)
            admitted = self._admit(self.waiting.interactive, chunks, batch, take_from_batch=True)
            budget -= admitted
            chunked += admitted
        if self.pacer is not None:
            self.pacer.spent(decodes, chunked)
        batch_share = min(budget, self._batch_share(live, self.max_num_batched_tokens - budget, budgets))
        batch_share -= self._run(self.running.batch, batch_share, batch)[0]
        # Batch work is admitted only behind every interactive request, and never under memory pressure.
        if not self.waiting.interactive and not batch.preempted:
            self._admit(self.waiting.batch, batch_share, batch, take_from_batch=False)
        for item in batch.items:
            if is_batch(item.seq):
                self.num_batch_tokens += item.num_new_tokens
            else:
                self.num_interactive_tokens += item.num_new_tokens
        return batch

    def update(
        self, batch: ScheduledBatch, sampled_token_ids: list[int], complete: Collection[str] = ()
    ) -> list[Sequence]:
        """Advance the computed counts, append one sampled token per sampling item (in batch order) and
        finish the sequences that stop on a token, on a complete grammar (`complete`: seq ids whose
        structured output is finished) or on a length. Returns the sequences that got a token."""
        sampled_iter = iter(sampled_token_ids)
        appended = []
        for item in batch.items:
            seq = item.seq
            seq.num_computed_tokens = item.end
            self._register_full_blocks(seq, item.start)
            if not item.samples:
                continue
            token_id = next(sampled_iter)
            if seq.finished:
                continue  # aborted while the step ran
            seq.token_ids.append(token_id)
            appended.append(seq)
            self._check_stop(seq, token_id, seq.seq_id in complete)
        return appended

    def finish(self, seq: Sequence, status: RequestStatus, stop_reason: str | int | None = None) -> None:
        """End a sequence for a reason found outside the scheduler (a stop string)."""
        if not seq.finished:
            seq.stop_reason = stop_reason
            self._finish(seq, status)

    # -- internals ---------------------------------------------------------------------------------

    @staticmethod
    def _item(seq: Sequence, num_new: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(seq, start, num_new, samples=start + num_new == seq.num_tokens)

    def _batch_share(self, live: bool, live_tokens: int, budgets: BatchBudget) -> int:
        """Tokens batch work may take in a step whose live work takes `live_tokens`."""
        if not live:
            return budgets.idle_tokens
        if self.step_costs is None or budgets.max_slowdown == 0:
            return budgets.fill_tokens if budgets.max_slowdown else 0
        return self.step_costs.affordable(live_tokens, budgets.max_slowdown, budgets.fill_tokens)

    def _live_decodes(self) -> int:
        return sum(1 for seq in self.running.interactive if seq.num_tokens - seq.num_computed_tokens == 1)

    def _prompt_allowance(self, decodes: int) -> int:
        """Prompt tokens the next step may take beside its `decodes` live decoding streams."""
        budget = self.max_num_batched_tokens
        if self.pacer is None:
            return budget
        allowance = self.pacer.allowance(decodes, budget - decodes)
        prompts = sum(seq.num_tokens - seq.num_computed_tokens for seq in self.running.interactive) - decodes
        prompts += sum(seq.num_tokens for seq in self.waiting.interactive)  # less their cached prefixes
        self.num_tpot_limited_steps += min(prompts, budget - decodes) > allowance
        return allowance

    def _run(
        self, running: list[Sequence], budget: int, batch: ScheduledBatch, chunks: int | None = None
    ) -> tuple[int, int]:
        """Schedule the next token of each decoding sequence of `running` (one class, oldest first) and the
        next chunk of each prefilling one, all within `budget` and the chunks within `chunks` (None: the
        budget only); returns the tokens used, and of them the chunks'."""
        chunks = budget if chunks is None else chunks
        used = chunked = 0
        index = 0
        while index < len(running) and used < budget:
            seq = running[index]
            self.window.slide(seq, self.pool)
            gap = seq.num_tokens - seq.num_computed_tokens
            num_new = min(gap, budget - used) if gap == 1 else min(gap, budget - used, chunks - chunked)
            if num_new == 0:
                index += 1
                continue  # a prefill past the chunk allowance waits; the decodes after it do not
            if not self._reserve_slots(seq, num_new, batch):
                break  # `seq` itself was preempted: everything after it already was.
            batch.items.append(self._item(seq, num_new))
            used += num_new
            chunked += num_new if gap > 1 else 0
            index += 1
        return used, chunked

    def _admit(
        self, waiting: deque[Sequence], budget: int, batch: ScheduledBatch, take_from_batch: bool
    ) -> int:
        """Admit from the head of `waiting` (one class) within `budget`; returns the tokens used. A sequence
        whose LoRA adapter cannot get a slot (every slot is pinned) steps aside until one frees up. With
        `take_from_batch` (interactive admission), running batch sequences are preempted, newest first, for
        the blocks, the sequence slot or the adapter slot the head needs."""
        used = 0
        stepped_aside: list[Sequence] = []
        while waiting and used < budget:
            seq = waiting[0]
            lora = seq.params.lora
            if (
                lora is not None
                and not self._can_pin(lora)
                and not (take_from_batch and self._free_adapter_slot(lora, batch))
            ):
                stepped_aside.append(waiting.popleft())
                continue
            plan = self._plan(seq, budget - used)
            if take_from_batch and not self._fits(plan):
                self._make_room(plan, batch)
            if not self._fits(plan):
                break  # first come, first served: do not let later requests overtake this one
            waiting.popleft()
            self._start(seq, plan, batch)
            used += plan.num_new
        waiting.extendleft(reversed(stepped_aside))
        return used

    def _plan(self, seq: Sequence, budget: int) -> _Admission:
        hits = self._match_prefix(seq)
        num_cached = len(hits) * self.block_size
        num_new = min(seq.num_tokens - num_cached, budget)
        # Cached blocks already out of the window are not taken at all.
        num_slid = self.window.slid_out(num_cached)
        blocks_needed = blocks_for(num_cached + num_new, self.block_size) - len(hits)
        return _Admission(hits[num_slid:], num_slid, num_cached, num_new, blocks_needed)

    def _fits(self, plan: _Admission) -> bool:
        # Cached blocks nobody references sit in the free queue: reusing them uses up free capacity too.
        num_revived = sum(1 for block_id in plan.hits if self.pool.ref_counts[block_id] == 0)
        return (
            len(self.running) < self.max_num_seqs
            and plan.blocks_needed + num_revived <= self.pool.num_free_blocks
        )

    def _make_room(self, plan: _Admission, batch: ScheduledBatch) -> None:
        """Preempt running batch sequences, newest first, until `plan` fits; none at all when even all of
        them would not be enough, since their work would be thrown away for nothing."""
        if len(self.running.interactive) >= self.max_num_seqs:
            return
        # A prefix hit among the blocks that would come free is freed and taken again: it gains nothing.
        reclaimable = self.running.blocks_only_batch_holds(self.pool.ref_counts)
        revived = sum(1 for b in plan.hits if self.pool.ref_counts[b] == 0 or b in reclaimable)
        if plan.blocks_needed + revived > self.pool.num_free_blocks + len(reclaimable):
            return
        while self.running.batch and not self._fits(plan):
            self._preempt_into(self.running.batch[-1], batch)

    def _free_adapter_slot(self, lora: LoRARequest, batch: ScheduledBatch) -> bool:
        """Preempt running batch sequences, newest first, until `lora` can get an adapter slot. Only those
        whose adapter no running interactive sequence uses can help: the others' slots stay pinned."""
        while not self._can_pin(lora):
            victim = self.running.newest_batch_pinning_alone()
            if victim is None:
                return False
            self._preempt_into(victim, batch)
        return True

    def _start(self, seq: Sequence, plan: _Admission, batch: ScheduledBatch) -> None:
        lora = seq.params.lora
        if lora is not None:
            self.loras.pin(lora)  # type: ignore[union-attr]  # _can_pin checked it exists
        self.pool.acquire(plan.hits)
        seq.block_ids = [NO_BLOCK] * plan.num_slid + plan.hits
        seq.num_computed_tokens = plan.num_cached
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = plan.num_cached
            self.num_cached_prompt_tokens += plan.num_cached
        seq.block_ids.extend(self.pool.allocate(plan.blocks_needed))
        seq.status = RequestStatus.RUNNING
        self.running.add(seq)
        batch.items.append(self._item(seq, plan.num_new))

    def _reserve_slots(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        """Make room for `num_new` more tokens of a running sequence, preempting the newest running batch
        sequences, then (for an interactive `seq` only) the newest interactive ones, as needed. False if
        `seq` had to preempt itself."""
        needed = blocks_for(seq.num_computed_tokens + num_new, self.block_size) - len(seq.block_ids)
        while needed > self.pool.num_free_blocks:
            victim = self.running.victim_for(seq)
            self._preempt_into(victim, batch)
            if victim is seq:
                return False
        if needed > 0:
            seq.block_ids.extend(self.pool.allocate(needed))
        return True

    def _can_pin(self, lora: LoRARequest) -> bool:
        if self.loras is None:
            raise RuntimeError("a LoRA request reached a scheduler without adapter slots")
        return self.loras.can_pin(lora)

    def _leave_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if seq.params.lora is not None and self.loras is not None:
            self.loras.unpin(seq.params.lora)

    def _preempt_into(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self._leave_running(seq)
        self.pool.release(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.status = RequestStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.num_batch_preemptions += int(is_batch(seq))
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq`. At least one token is always left to compute, because
        the step that computes the last token is the one that produces the next token's logits."""
        self._extend_hashes(seq, seq.num_tokens)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        return self.pool.lookup_prefix(seq.block_hashes[:max_blocks])

    def _extend_hashes(self, seq: Sequence, upto_tokens: int) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), upto_tokens // bs):
            parent = seq.block_hashes[i - 1] if i else _cache_salt(seq)
            seq.block_hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs]))

    def _register_full_blocks(self, seq: Sequence, start: int) -> None:
        """Index the blocks this step filled, so later requests with the same prefix can share them."""
        if not self.pool.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        self._extend_hashes(seq, num_full * self.block_size)
        for i in range(start // self.block_size, num_full):
            self.pool.register(seq.block_ids[i], seq.block_hashes[i])

    def _check_stop(self, seq: Sequence, token_id: int, grammar_complete: bool = False) -> None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return self._finish(seq, RequestStatus.FINISHED_STOPPED)
            if token_id in params.stop_token_ids:
                seq.stop_reason = token_id
                return self._finish(seq, RequestStatus.FINISHED_STOPPED)
        # Nothing more can follow a complete grammar, so neither min_tokens nor ignore_eos can extend it;
        # and a grammar completed by the last allowed token is a complete output, not a truncated one.
        if grammar_complete:
            return self._finish(seq, RequestStatus.FINISHED_STOPPED)
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, RequestStatus.FINISHED_LENGTH)

    def _finish(self, seq: Sequence, status: RequestStatus) -> None:
        if seq.status == RequestStatus.RUNNING:
            self._leave_running(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.block_ids)
        seq.block_ids = []
        seq.status = status


def _cache_salt(seq: Sequence) -> BlockHash | None:
    """Prefix-cache blocks are keyed by the adapter too: KV computed under one adapter (or the base model)
    is wrong for any other."""
    lora = seq.params.lora
    return None if lora is None else hash_salt("lora", lora.name, lora.path)


@dataclass(slots=True)
class _Admission:
    """What admitting a waiting sequence takes: its prefix-cache hits and the blocks for its first chunk."""

    hits: list[int]
    """The cached blocks it takes (those in the window, for sliding-window models)."""
    num_slid: int
    """Cached blocks before `hits` that it does not take: they are out of every layer's window."""
    num_cached: int
    num_new: int
    blocks_needed: int
