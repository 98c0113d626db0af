"""Attention over the paged KV cache, behind one small interface so a fused kernel can replace the torch one.

Token layout of a step (built by the model runner):
    [ decode tokens (one per decoding sequence) | prefill chunk 0 | prefill chunk 1 | ... ]
Each layer's cache is a flat array of slots `[num_blocks * block_size, num_kv_heads, head_dim]`; a token
at position p of a sequence lives in slot `block_ids[p // block_size] * block_size + p % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch.nn import functional as F


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    token_offset: int
    """Where the chunk's queries start in the step's token layout."""
    num_tokens: int
    start: int
    """Position of the chunk's first token in its sequence; 0 means nothing is cached before it."""
    slots: torch.Tensor | None
    """[start + num_tokens] cache slots of the whole context, for chunks that continue a sequence."""


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Everything attention needs about a step, built once and shared by all layers."""

    slot_mapping: torch.Tensor
    """[num_tokens] where each new token's K/V is written."""
    num_decode_tokens: int
    decode_slots: torch.Tensor | None
    """[num_decodes, max_context] cache slots of each decoding sequence's context (padded)."""
    decode_mask: torch.Tensor | None
    """[num_decodes, 1, 1, max_context] True where the slot belongs to the context."""
    prefills: tuple[PrefillChunk, ...]


class AttentionBackend(Protocol):
    """Writes the step's new K/V into the layer's cache, then attends each query to its sequence's context.
    q: [T, H, D]; k, v: [T, KV, D]; caches: [slots, KV, D]. Returns [T, H, D]."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...


def torch_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Reference backend built from torch ops; runs on CPU and CUDA."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale)
    for chunk in meta.prefills:
        rows = slice(chunk.token_offset, chunk.token_offset + chunk.num_tokens)
        query = q[rows].transpose(0, 1).unsqueeze(0)
        if chunk.start == 0:
            keys, values, mask, causal = k[rows], v[rows], None, True
        else:
            keys, values = k_cache[chunk.slots], v_cache[chunk.slots]
            # Query i (at position start + i) sees keys 0 .. start + i.
            ctx = chunk.start + chunk.num_tokens
            key_pos = torch.arange(ctx, device=q.device)
            query_pos = torch.arange(chunk.start, ctx, device=q.device)
            mask, causal = key_pos[None, :] <= query_pos[:, None], False
        out[rows] = (
            F.scaled_dot_product_attention(
                query,
                keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=causal,
                scale=scale,
                enable_gqa=True,
            )
            .squeeze(0)
            .transpose(0, 1)
        )
    return out


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """One query per sequence against its padded context, as two batched matmuls. On CPU this is an order
    of magnitude faster than SDPA's flash kernel, which is built for long query blocks."""
    assert meta.decode_slots is not None and meta.decode_mask is not None
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    # [N, L, KV, D] -> [N, KV, L, D]; query heads grouped by the KV head they share: [N, KV, G, D].
    keys = k_cache[meta.decode_slots].transpose(1, 2)
    values = v_cache[meta.decode_slots].transpose(1, 2)
    grouped = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale
    scores.masked_fill_(~meta.decode_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).view(num_seqs, num_heads, head_dim)
