"""Continuous batching: each step packs decodes and prefill chunks under a token budget and a sequence cap,
and preempts (recompute later) instead of failing when KV blocks run out. Pure Python, no torch.

There is no prefill or decode phase: a sequence has `num_computed_tokens` of `num_tokens` in the cache and
each step closes part of that gap. A decode is a gap of 1; a chunked prefill is a gap larger than the
budget; a preempted sequence simply restarts from 0 (minus whatever the prefix cache still holds).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Protocol

from tokenmill.engine.batch import ScheduledBatch, ScheduledSeq
from tokenmill.engine.block_pool import BlockHash, BlockPool, hash_block, hash_salt
from tokenmill.engine.request import RequestStatus, Sequence
from tokenmill.engine.sampling_params import InvalidRequestError

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
        eos_token_ids: Iterable[int] = (),
        loras: AdapterSlots | None = None,
    ) -> None:
        self.pool = block_pool
        self.loras = loras
        self.block_size = block_pool.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_cached_prompt_tokens = 0
        self.num_preemptions = 0

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
        blocks_needed = -(-(num_prompt_tokens + max_tokens - 1) // self.block_size)
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
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # Running sequences first (oldest first): they hold memory, finishing them frees it.
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve_slots(seq, num_new, batch):
                break  # `seq` itself was preempted: everything after it already was.
            batch.items.append(self._item(seq, num_new))
            budget -= num_new
            index += 1
        # Admit waiting sequences only when nobody had to give memory back this step. A sequence whose LoRA
        # adapter cannot get a slot (every slot is pinned) steps aside until one frees up.
        stepped_aside: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            seq = self.waiting[0]
            lora = seq.params.lora
            if lora is not None and not self._can_pin(lora):
                stepped_aside.append(self.waiting.popleft())
                continue
            hits = self._match_prefix(seq)
            num_cached = len(hits) * self.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            blocks_needed = self._blocks_needed(num_cached + num_new) - len(hits)
            # Cached blocks nobody references sit in the free queue: reusing them uses up free capacity too.
            num_revived = sum(1 for block_id in hits if self.pool.ref_counts[block_id] == 0)
            if blocks_needed + num_revived > self.pool.num_free_blocks:
                break  # first come, first served: do not let later requests overtake this one
            self.waiting.popleft()
            if lora is not None:
                self.loras.pin(lora)  # type: ignore[union-attr]  # _can_pin checked it exists
            self.pool.acquire(hits)
            seq.block_ids = hits
            seq.num_computed_tokens = num_cached
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_cached
                self.num_cached_prompt_tokens += num_cached
            seq.block_ids.extend(self.pool.allocate(blocks_needed))
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            batch.items.append(self._item(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(stepped_aside))
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

    def _blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _reserve_slots(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        """Make room for `num_new` more tokens of a running sequence, preempting the newest running
        sequences as needed. False if `seq` had to preempt itself."""
        needed = self._blocks_needed(seq.num_computed_tokens + num_new) - len(seq.block_ids)
        while needed > self.pool.num_free_blocks:
            victim = self.running[-1]
            self._preempt(victim)
            batch.preempted.append(victim)
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

    def _preempt(self, seq: Sequence) -> None:
        self._leave_running(seq)
        self.pool.release(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.status = RequestStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

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
