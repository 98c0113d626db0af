"""Which KV blocks a sequence of a sliding-window model still needs (every layer attends to at most its
last `window` tokens): those that slid out of the window are given back as the sequence advances, so it
holds about a window of KV however long it grows. Pure Python: block counts, not tensors."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.engine.block_pool import NO_BLOCK, BlockPool
from tokenmill.engine.request import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(frozen=True, slots=True)
class KvWindow:
    window: int | None
    """The most recent tokens any layer attends to; None: sequences keep all their KV."""
    block_size: int
    max_step_tokens: int
    """The most tokens one step computes for a sequence (the scheduler's token budget)."""

    def peak_blocks(self, num_tokens: int) -> int:
        """The most blocks a sequence of `num_tokens` holds at once."""
        blocks = blocks_for(num_tokens, self.block_size)
        if self.window is None:
            return blocks
        # A step's chunk and the window before its first token, each end possibly in a partial block.
        return min(blocks, blocks_for(self.window - 1 + self.max_step_tokens, self.block_size) + 1)

    def slid_out(self, num_computed: int) -> int:
        """How many leading blocks of a sequence with `num_computed` tokens in the cache no later query
        reads: the next query (at position num_computed) reads keys from num_computed - window + 1 on."""
        if self.window is None:
            return 0
        return max(0, num_computed - self.window + 1) // self.block_size

    def slide(self, seq: Sequence, pool: BlockPool) -> None:
        """Give back the blocks that slid out of every layer's window (newest first, so each is released
        once: the older ones already were)."""
        released = []
        index = self.slid_out(seq.num_computed_tokens) - 1
        while index >= 0 and seq.block_ids[index] != NO_BLOCK:
            released.append(seq.block_ids[index])
            seq.block_ids[index] = NO_BLOCK
            index -= 1
        pool.release(released)
