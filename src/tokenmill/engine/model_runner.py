"""ScheduledBatch -> tensors (ids, positions, slots, decode context tables) -> one forward pass -> logits.

The runner owns the model and the KV cache tensors; which blocks a sequence owns is the block pool's business.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tokenmill.engine.batch import ScheduledBatch, ScheduledSeq
from tokenmill.models.attention import AttentionMetadata, PrefillChunk


def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * len(model.layers) * block_size * model.num_kv_heads * model.head_dim * element_size


class ModelRunner:
    def __init__(
        self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        num_slots = num_blocks * block_size
        shape = (num_slots, model.num_kv_heads, model.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in model.layers
        ]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits (float32) for the sequences that sample this step, in `batch.sampling_items` order."""
        decodes = [item for item in batch.items if item.num_new_tokens == 1]
        prefills = [item for item in batch.items if item.num_new_tokens > 1]
        ordered = decodes + prefills
        input_ids, positions, slots = self._flatten(ordered)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            num_decode_tokens=len(decodes),
            **self._decode_tables(decodes),
            prefills=self._prefill_chunks(prefills, len(decodes)),
        )
        hidden = self.model(self._tensor(input_ids), self._tensor(positions), self.kv_caches, meta)
        # Each sampling sequence's last token in the layout, in batch order.
        last_token = {}
        offset = 0
        for item in ordered:
            offset += item.num_new_tokens
            last_token[id(item)] = offset - 1
        rows = [last_token[id(item)] for item in batch.items if item.samples]
        return self.model.compute_logits(hidden[self._tensor(rows)]).float()

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
        block_ids = np.asarray(item.seq.block_ids, dtype=np.int64)
        return (block_ids[:, None] * self.block_size + np.arange(self.block_size)).reshape(-1)[: item.end]

    def _decode_tables(self, decodes: list[ScheduledSeq]) -> dict[str, torch.Tensor | None]:
        if not decodes:
            return {"decode_slots": None, "decode_mask": None}
        bs = self.block_size
        num_blocks = max(len(item.seq.block_ids) for item in decodes)
        table = np.zeros((len(decodes), num_blocks), dtype=np.int64)
        for row, item in enumerate(decodes):
            table[row, : len(item.seq.block_ids)] = item.seq.block_ids
        slots = (table[:, :, None] * bs + np.arange(bs)).reshape(len(decodes), -1)
        context_lens = np.asarray([item.end for item in decodes])
        max_len = int(context_lens.max())
        mask = np.arange(max_len)[None, :] < context_lens[:, None]
        return {
            "decode_slots": self._tensor(slots[:, :max_len]),
            "decode_mask": torch.as_tensor(mask, device=self.device)[:, None, None, :],
        }

    def _prefill_chunks(self, prefills: list[ScheduledSeq], offset: int) -> tuple[PrefillChunk, ...]:
        chunks = []
        for item in prefills:
            slots = self._tensor(self._context_slots(item)) if item.start else None
            chunks.append(PrefillChunk(offset, item.num_new_tokens, item.start, slots))
            offset += item.num_new_tokens
        return tuple(chunks)
