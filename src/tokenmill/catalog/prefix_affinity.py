"""Which replica recently served which prompt prefix, so a request that shares a prefix with earlier ones (a
system prompt, a few-shot preamble, a long conversation's history) goes where that prefix's KV is cached.

Prefixes are keyed like the engine's prefix cache keys its blocks: a chain of hashes over fixed-size blocks
of token ids, salted by the LoRA adapter (KV computed under one adapter is no use to another). The table is
bounded: the least recently used prefixes are forgotten first, as a replica's cache evicts its coldest
blocks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from tokenmill.engine.block_pool import BlockHash, hash_block, hash_salt

BLOCK_TOKENS = 16
"""Tokens per hashed block: the engine's default block size, so a match means whole cached blocks."""
MAX_BLOCKS = 64
"""Only the first 1,024 tokens are looked at: enough to tell shared preambles apart, cheap to hash."""
CAPACITY = 65_536
"""Prefixes remembered (about 3 MB): far more blocks than a replica's KV pool holds on this hardware."""


class PrefixAffinity:
    """Synchronous and lock-free, like the router it serves (every call happens on the event loop)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._owner: OrderedDict[BlockHash, int] = OrderedDict()
        """Hash of a prefix of whole blocks -> the replica (its index) that served it last."""

    def hashes(self, prompt_ids: Sequence[int], salt: str | None = None) -> list[BlockHash]:
        """Chained hashes of the prompt's whole blocks, up to MAX_BLOCKS."""
        num_blocks = min(len(prompt_ids) // BLOCK_TOKENS, MAX_BLOCKS)
        parent = hash_salt("lora", salt) if salt is not None else None
        hashes = []
        for i in range(num_blocks):
            parent = hash_block(parent, prompt_ids[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS])
            hashes.append(parent)
        return hashes

    def session(self, user: str) -> list[BlockHash]:
        """The key of a session (the `user` a request names), remembered like a one-block prefix."""
        return [hash_salt("user", user)]

    def owner(self, hashes: Sequence[BlockHash]) -> tuple[int, int] | None:
        """(replica, tokens matched) for the longest remembered prefix of `hashes`; None if none is."""
        for length in range(len(hashes), 0, -1):
            replica = self._owner.get(hashes[length - 1])
            if replica is not None:
                return replica, length * BLOCK_TOKENS
        return None

    def record(self, hashes: Sequence[BlockHash], replica: int) -> None:
        """`replica` now holds these prefixes (it is about to compute or reuse them)."""
        for block_hash in hashes:
            self._owner[block_hash] = replica
            self._owner.move_to_end(block_hash)
        while len(self._owner) > self._capacity:
            self._owner.popitem(last=False)

    def forget(self, replica: int) -> None:
        """A replica that restarted lost its cache: nothing it served is warm any more."""
        for block_hash in [h for h, r in self._owner.items() if r == replica]:
            del self._owner[block_hash]
