"""The C decode kernel against the torch backend on the same paged cache: same outputs for every layout the
engine produces (GQA group sizes, block sizes, ragged contexts, one or several threads, sliding windows, one
tensor read as K and V)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmill.models.attention import TorchPagedAttention
from tokenmill.models.cpu_attention import KernelPagedAttention, load_kernel

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kernel():
    compiled = load_kernel()
    if compiled is None:
        pytest.skip("no C compiler: the engine falls back to the torch backend")
    return compiled


def paged_case(context_lens, num_kv_heads, group, head_dim, block_size, dtype, seed=0):
    """A cache whose blocks are handed out in shuffled order, as after many allocations and frees."""
    rng = np.random.default_rng(seed)
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    order = rng.permutation(num_blocks)
    max_blocks = max(-(-n // block_size) for n in context_lens)
    tables = np.zeros((len(context_lens), max_blocks), dtype=np.int64)
    used = 0
    for row, n in enumerate(context_lens):
        count = -(-n // block_size)
        tables[row, :count] = order[used : used + count]
        used += count
    gen = torch.Generator().manual_seed(seed)
    shape = (num_kv_heads, num_blocks * block_size, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(len(context_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    lens = np.asarray(sorted(context_lens, reverse=True), dtype=np.int64)
    return q, k_cache, v_cache, tables, lens


@pytest.mark.parametrize(
    "num_kv_heads,group,head_dim", [(3, 3, 64), (2, 1, 32), (1, 8, 128), (4, 4, 16), (1, 12, 32)]
)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("window", [None, 20])
def test_kernel_equals_torch_backend_float32(
    kernel, num_kv_heads, group, head_dim, block_size, num_threads, window
):
    contexts = [1, 2, 17, 300, 64, 5, 129, 33]
    q, k_cache, v_cache, tables, lens = paged_case(
        contexts, num_kv_heads, group, head_dim, block_size, torch.float32
    )
    reference, fast = TorchPagedAttention(), KernelPagedAttention(kernel, num_threads)
    scale = head_dim**-0.5
    groups = reference.prepare_decodes(tables, lens, block_size, CPU)
    expected = reference.decode(q, k_cache, v_cache, groups, scale, window)
    got = fast.decode(q, k_cache, v_cache, fast.prepare_decodes(tables, lens, block_size, CPU), scale, window)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
    if window is not None:  # the window changes the answer wherever a context is longer than it
        full = reference.decode(q, k_cache, v_cache, groups, scale)
        longer = torch.as_tensor(lens > window)
        assert not torch.allclose(full[longer], expected[longer])
        torch.testing.assert_close(full[~longer], expected[~longer])


def test_one_tensor_read_as_keys_and_values(kernel):
    """Multi-head Latent Attention's layout: one cached latent per token, shared by every query head."""
    q, k_cache, _, tables, lens = paged_case([40, 9, 130], 1, 16, 48, 16, torch.float32)
    reference, fast = TorchPagedAttention(), KernelPagedAttention(kernel, 2)
    expected = reference.decode(
        q, k_cache, k_cache.clone(), reference.prepare_decodes(tables, lens, 16, CPU), 0.1
    )
    got = fast.decode(q, k_cache, k_cache, fast.prepare_decodes(tables, lens, 16, CPU), 0.1)
    shared = reference.decode(q, k_cache, k_cache, reference.prepare_decodes(tables, lens, 16, CPU), 0.1)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(shared, expected, atol=2e-6, rtol=1e-5)


def test_kernel_bfloat16_is_within_rounding_of_the_float32_reference(kernel):
    q, k_cache, v_cache, tables, lens = paged_case([700, 450, 3, 90], 3, 3, 64, 16, torch.bfloat16)
    fast, reference = KernelPagedAttention(kernel, 2), TorchPagedAttention()
    got = fast.decode(q, k_cache, v_cache, fast.prepare_decodes(tables, lens, 16, CPU), 0.125)
    # The same bf16 inputs, attended in float32 by the torch backend: only the output rounding may differ.
    groups = reference.prepare_decodes(tables, lens, 16, CPU)
    exact = reference.decode(q.float(), k_cache.float(), v_cache.float(), groups, 0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "num_kv_heads,group,head_dim,block_size,window",
    [(3, 3, 64, 16, None), (1, 8, 128, 32, None), (2, 1, 32, 16, 20), (1, 12, 32, 64, None)],
)
def test_bfloat16_rows_attend_the_same_alone_as_in_any_step(
    kernel, num_kv_heads, group, head_dim, block_size, window
):
    """A token's attention must not depend on what else its step holds: a prompt chunk's 70 tokens (each a
    query over its sequence's cache up to itself) beside two decodes, attended in one call, split over two
    threads, and one row at a time, give the same bits. (With AMX or AVX-512 BF16, bfloat16 rows go
    through tiles of 16 rows: a prompt's tokens share tiles, a decode's query heads fill one alone, and
    without AMX a few rows take their scores on vectors over positions, the others on vectors over rows.)
    And within bfloat16 rounding of the float32 reference."""
    q, k_cache, v_cache, tables, lens = paged_case(
        [300, 41, 70], num_kv_heads, group, head_dim, block_size, torch.bfloat16
    )
    # Rows: the 300- and 41-token sequences' decodes, then the 70-token one's prompt tokens 1 to 70.
    tables = np.vstack([tables[:2], np.repeat(tables[2:3], 70, axis=0)])
    lens = np.concatenate([[300, 41], np.arange(1, 71)])
    # Queries 4x randn: scores of ~4-8 make a last-bit difference in one visible in some bfloat16 outputs
    # (at 1x, summing a few rows' dimensions in reverse order went unnoticed).
    q = (
        torch.randn(len(lens), num_kv_heads * group, head_dim, generator=torch.Generator().manual_seed(1))
        .mul(4)
        .bfloat16()
    )
    scale = head_dim**-0.5
    step = KernelPagedAttention(kernel, 1)
    together = step.decode(
        q, k_cache, v_cache, step.prepare_decodes(tables, lens, block_size, CPU), scale, window
    )
    split = KernelPagedAttention(kernel, 2)
    assert torch.equal(
        split.decode(
            q, k_cache, v_cache, split.prepare_decodes(tables, lens, block_size, CPU), scale, window
        ),
        together,
    )
    for row in range(len(lens)):
        alone = step.prepare_decodes(tables[row : row + 1], lens[row : row + 1], block_size, CPU)
        assert torch.equal(
            step.decode(q[row : row + 1], k_cache, v_cache, alone, scale, window), together[row : row + 1]
        )
    reference = TorchPagedAttention()
    groups = reference.prepare_decodes(tables, lens, block_size, CPU)
    exact = reference.decode(q.float(), k_cache.float(), v_cache.float(), groups, scale, window)
    torch.testing.assert_close(together.float(), exact, atol=1e-2, rtol=1e-2)
