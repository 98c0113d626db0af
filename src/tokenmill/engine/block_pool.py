"""Paged KV memory: a pool of fixed-size blocks with reference counts, a prefix-hash index and LRU eviction.

Pure Python (no torch): the model runner owns the tensors, this owns which block belongs to whom.

A block is in exactly one of three states:
    in use      ref_count > 0                       (in some sequence's block table)
    cached      ref_count == 0, hash registered      (in the free queue; reusable by a prefix hit until evicted)
    empty       ref_count == 0, no hash              (in the free queue)
The free queue is ordered least-recently-freed first, so allocation evicts the coldest cached block.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import xxhash

BlockHash = bytes

NO_BLOCK = -1
"""A block-table entry whose block was given back: it slid out of the attention window of every layer
(sliding-window models), so no query of the sequence reads it again. Releasing it is a no-op."""


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Identity of a full block: its tokens and everything before them (through the parent's hash)."""
    h = xxhash.xxh3_128()
    if parent is not None:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def hash_salt(*parts: str) -> BlockHash:
    """A parent for a sequence's first block, so sequences that must never share KV (different LoRA
    adapters, or an adapter and the base model) never produce the same block hashes."""
    h = xxhash.xxh3_128()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.digest()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}
        # Insertion-ordered set of free block ids; the front is evicted first.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def lookup_prefix(self, block_hashes: Iterable[BlockHash]) -> list[int]:
        """Block ids of the longest cached prefix of `block_hashes` (not yet referenced: call `acquire`)."""
        hits: list[int] = []
        if not self.enable_prefix_caching:
            return hits
        for block_hash in block_hashes:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def acquire(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks (a prefix hit); a free cached block leaves the free queue."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1

    def allocate(self, num: int) -> list[int]:
        """Take `num` blocks from the free queue, evicting the coldest cached ones. Caller checks capacity."""
        if num > len(self.free_queue):
            raise RuntimeError(f"allocate({num}) with only {len(self.free_queue)} free blocks")
        block_ids = []
        for _ in range(num):
            block_id, _ = self.free_queue.popitem(last=False)
            self._forget_hash(block_id)
            self.ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block. Blocks are released tail first, so that when memory runs
        short the end of a sequence is evicted before its prefix (which other requests are likelier to share)."""
        for block_id in reversed(block_ids):
            if block_id == NO_BLOCK:
                continue
            count = self.ref_counts[block_id] - 1
            if count < 0:
                raise RuntimeError(f"block {block_id} released more often than acquired")
            self.ref_counts[block_id] = count
            if count == 0:
                if self.block_hash[block_id] is None:
                    # Nothing reusable in it: hand it out before any cached block.
                    self.free_queue[block_id] = None
                    self.free_queue.move_to_end(block_id, last=False)
                else:
                    self.free_queue[block_id] = None

    def register(self, block_id: int, block_hash: BlockHash) -> None:
        """Record that `block_id` now holds the full block identified by `block_hash`."""
        if not self.enable_prefix_caching or self.block_hash[block_id] is not None:
            return
        # A duplicate (two sequences computed the same block concurrently) keeps the first copy indexed.
        if block_hash not in self.cached:
            self.cached[block_hash] = block_id
            self.block_hash[block_id] = block_hash

    def _forget_hash(self, block_id: int) -> None:
        block_hash = self.block_hash[block_id]
        if block_hash is not None:
            self.block_hash[block_id] = None
            if self.cached.get(block_hash) == block_id:
                del self.cached[block_hash]

    def check_invariants(self) -> None:
        """For tests: every block is either referenced or free, never both; the index points back."""
        for block_id in range(self.num_blocks):
            assert (self.ref_counts[block_id] == 0) == (block_id in self.free_queue), block_id
        for block_hash, block_id in self.cached.items():
            assert self.block_hash[block_id] == block_hash
