"""BlockPool without a model: exact block ids, reference counts, prefix hits and eviction order."""

import pytest

from tokenmill.engine.block_pool import BlockPool, hash_block


def test_allocate_release_returns_blocks_and_keeps_invariants():
    pool = BlockPool(num_blocks=4, block_size=2)
    a = pool.allocate(3)
    assert a == [0, 1, 2]
    assert pool.num_free_blocks == 1
    pool.release(a)
    assert pool.num_free_blocks == 4
    pool.check_invariants()
    with pytest.raises(RuntimeError):
        pool.allocate(5)


def test_double_release_is_an_error():
    pool = BlockPool(num_blocks=2, block_size=2)
    blocks = pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(blocks)


def test_hash_chains_through_parent():
    first = hash_block(None, [1, 2])
    assert hash_block(first, [3, 4]) != hash_block(None, [3, 4])
    assert hash_block(first, [3, 4]) == hash_block(hash_block(None, [1, 2]), [3, 4])


def test_prefix_hit_shares_blocks_until_evicted():
    pool = BlockPool(num_blocks=4, block_size=2)
    h0 = hash_block(None, [1, 2])
    h1 = hash_block(h0, [3, 4])
    blocks = pool.allocate(2)
    pool.register(blocks[0], h0)
    pool.register(blocks[1], h1)
    # While referenced, another sequence can share the blocks.
    assert pool.lookup_prefix([h0, h1, hash_block(h1, [5, 6])]) == blocks
    pool.acquire(blocks)
    assert pool.ref_counts[blocks[0]] == 2
    pool.release(blocks)
    pool.release(blocks)
    # Unreferenced but still cached: a later request still hits.
    assert pool.lookup_prefix([h0, h1]) == blocks
    pool.check_invariants()


def test_eviction_prefers_empty_blocks_then_least_recently_freed_and_tail_first():
    pool = BlockPool(num_blocks=4, block_size=1)
    a = pool.allocate(2)  # [0, 1]
    b = pool.allocate(2)  # [2, 3]
    hashes = {}
    parent = None
    for block_id in a:
        parent = hashes[block_id] = hash_block(parent, [block_id])
        pool.register(block_id, parent)
    pool.release(a)  # cached; freed tail first: order 1, 0
    pool.release(b)  # empty: handed out before any cached block
    assert pool.allocate(2) == [2, 3]
    # Then the cached blocks go, the sequence's tail (1) before its head (0).
    assert pool.allocate(1) == [1]
    assert pool.lookup_prefix([hashes[0], hashes[1]]) == [0]
    pool.check_invariants()


def test_disabled_prefix_caching_never_hits():
    pool = BlockPool(num_blocks=2, block_size=1, enable_prefix_caching=False)
    h = hash_block(None, [7])
    block = pool.allocate(1)
    pool.register(block[0], h)
    assert pool.lookup_prefix([h]) == []
