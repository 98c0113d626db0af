"""ScheduledBatch -> tensors (ids, positions, slots, decode context tables) -> one forward pass -> logits.

The runner owns the model and the KV cache tensors; which blocks a sequence owns is the block pool's business.
"""

from __future__ import annotations

import ctypes
import sys
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from tokenmill.engine.batch import ScheduledBatch, ScheduledSeq
from tokenmill.models.attention import AttentionMetadata, PrefillChunk, continuing_chunk_mask

if TYPE_CHECKING:
    from tokenmill.engine.lora import LoRASlots
    from tokenmill.models.lora_layers import LoRAStep


def keep_freed_memory_mapped() -> None:
    """Every layer allocates and frees multi-megabyte tensors (gathered contexts, activations). glibc returns
    blocks above its mmap threshold to the kernel at once, so each allocation page-faults its memory in again;
    on CPU that tripled the time of a decode step. Raising the thresholds keeps freed memory for reuse."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (e.g. musl): nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
    libc.mallopt(m_trim_threshold, 1 << 30)


def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    return block_size * sum(layer.bytes_per_token(dtype) for layer in model.cache_layout)


def _readable(block_ids: list[int]) -> np.ndarray:
    """A block table whose given-back entries (NO_BLOCK: out of every layer's window) point at block 0, so
    gathers stay in bounds; attention masks those positions, so what block 0 holds never counts."""
    return np.maximum(np.asarray(block_ids, dtype=np.int64), 0)


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        loras: LoRASlots | None = None,
    ) -> None:
        self.model = model
        self.loras = loras
        self.block_size = block_size
        self.device = device
        if device.type == "cpu":
            keep_freed_memory_mapped()
        self.kv_caches = [
            layer.allocate(num_blocks * block_size, dtype, device) for layer in model.cache_layout
        ]
        step_kernel = getattr(model, "decode_step", None)
        self.max_query_rows = 0 if step_kernel is None else step_kernel.max_rows
        """Steps of up to this many tokens, prompt tokens included, run whole in the model's CPU step kernel."""

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits for the sequences that sample this step, in `batch.sampling_items` order, in the dtype the
        model's head wrote them (the sampler reads bfloat16 as it is, with no float32 copy of the step's)."""
        # Decodes first, longest context first (backends that pad group similar lengths together).
        decodes = sorted((item for item in batch.items if item.num_new_tokens == 1), key=lambda i: -i.end)
        prefills = [item for item in batch.items if item.num_new_tokens > 1]
        ordered = decodes + prefills
        input_ids, positions, slots = self._flatten(ordered)
        if prefills and len(input_ids) <= self.max_query_rows:
            # A step this small runs whole in the CPU step kernel, which attends row by row: each prompt
            # token is a query over its sequence's cache up to itself (its K/V is written before any query
            # reads), as a decode is.
            decodes, prefills = ordered, []
        num_decodes = len(input_ids) - sum(item.num_new_tokens for item in prefills)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            num_decodes=num_decodes,
            decodes=self._prepare_decodes(decodes) if decodes else None,
            prefills=self._prefill_chunks(prefills, num_decodes),
        )
        lora = self._lora_step(ordered)
        hidden = self.model(self._tensor(input_ids), self._tensor(positions), self.kv_caches, meta, lora)
        # Each sampling sequence's last token in the layout, in batch order.
        last_token = {}
        offset = 0
        for item in ordered:
            offset += item.num_new_tokens
            last_token[id(item)] = offset - 1
        rows = [last_token[id(item)] for item in batch.items if item.samples]
        return self.model.compute_logits(hidden[self._tensor(rows)])

    def _lora_step(self, items: list[ScheduledSeq]) -> LoRAStep | None:
        """The step's adapted token ranges grouped by adapter; None (no LoRA work) when no row has one."""
        segments = []
        offset = 0
        for item in items:
            lora = item.seq.params.lora
            if lora is not None:
                segments.append((offset, item.num_new_tokens, lora))
            offset += item.num_new_tokens
        if not segments:
            return None
        assert self.loras is not None, "a LoRA request reached a runner without adapter slots"
        return self.loras.step(segments)

    def _tensor(self, values: list[int] | np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.int64), device=self.device)

    def _flatten(self, items: list[ScheduledSeq]) -> tuple[list[int], list[int], np.ndarray]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots = []
        bs = self.block_size
        for item in items:
            input_ids.extend(item.seq.token_ids[item.start : item.end])
            pos = np.arange(item.start, item.end)
            positions.extend(range(item.start, item.end))
            block_ids = np.asarray(item.seq.block_ids, dtype=np.int64)
            slots.append(block_ids[pos // bs] * bs + pos % bs)
        return input_ids, positions, np.concatenate(slots)

    def _context_slots(self, item: ScheduledSeq) -> np.ndarray:
        block_ids = _readable(item.seq.block_ids)
        return (block_ids[:, None] * self.block_size + np.arange(self.block_size)).reshape(-1)[: item.end]

    def _prepare_decodes(self, decodes: list[ScheduledSeq]) -> object:
        """A row per token: its sequence's block table, and the context up to and including it."""
        num_blocks = max(len(item.seq.block_ids) for item in decodes)
        num_rows = sum(item.num_new_tokens for item in decodes)
        block_tables = np.zeros((num_rows, num_blocks), dtype=np.int64)
        context_lens = np.empty(num_rows, dtype=np.int64)
        row = 0
        for item in decodes:
            rows = slice(row, row + item.num_new_tokens)
            block_tables[rows, : len(item.seq.block_ids)] = _readable(item.seq.block_ids)
            context_lens[rows] = np.arange(item.start + 1, item.end + 1)
            row = rows.stop
        return self.model.attention_backend.prepare_decodes(
            block_tables, context_lens, self.block_size, self.device
        )

    def _prefill_chunks(self, prefills: list[ScheduledSeq], offset: int) -> tuple[PrefillChunk, ...]:
        chunks = []
        for item in prefills:
            if item.start == 0:
                chunks.append(PrefillChunk(offset, item.num_new_tokens, 0))
            else:
                mask = continuing_chunk_mask(item.start, item.end, self.device)
                slots = self._tensor(self._context_slots(item))
                chunks.append(PrefillChunk(offset, item.num_new_tokens, item.start, slots, mask))
            offset += item.num_new_tokens
        return tuple(chunks)
