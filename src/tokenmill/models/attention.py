"""Attention over the paged KV cache, behind one small interface so a fused kernel can replace the torch one.

Token layout of a step (built by the model runner):
    [ decode tokens (one per decoding sequence) | prefill chunk 0 | prefill chunk 1 | ... ]
Each layer's cache is `[num_kv_heads, num_blocks * block_size, head_dim]` for K and for V (one tensor read as
both where the layer's `LayerCache.shared_kv` says so: MLA's latent): a token at position p of a
sequence lives in slot `block_ids[p // block_size] * block_size + p % block_size` of every KV head. Heads
come first so that gathering a context (`index_select` on dim 1) yields tensors batched matmul and SDPA
consume without another copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn import functional as F


@dataclass(frozen=True, slots=True)
class LayerCache:
    """What one attention layer keeps per cached token, and how far back it looks. Models list one per layer
    (`cache_layout`); the model runner allocates the cache from it, the scheduler frees blocks from it."""

    num_heads: int
    head_dim: int
    group_size: int = 1
    """Query heads per cached head (grouped-query attention; MLA: every query head reads the one latent)."""
    shared_kv: bool = False
    """One tensor serves as both K and V (Multi-head Latent Attention caches one latent vector per token)."""
    window: int | None = None
    """Sliding-window attention: a query at position p sees keys p - window + 1 .. p (None: all of them)."""

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return (1 if self.shared_kv else 2) * self.num_heads * self.head_dim * dtype.itemsize

    def allocate(
        self, num_slots: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K cache, V cache) of `num_slots` tokens; the same tensor twice when K and V are shared."""
        k_cache = torch.zeros((self.num_heads, num_slots, self.head_dim), dtype=dtype, device=device)
        if self.shared_kv:
            return k_cache, k_cache
        return k_cache, torch.zeros_like(k_cache)


def sliding_windows(config: object, num_layers: int) -> list[int | None]:
    """Each layer's window as transformers configures it: `layer_types` where the config has them (Gemma 3,
    Qwen2/3: "sliding_attention" layers use `sliding_window`), otherwise every layer when `sliding_window` is
    set and not switched off (Mistral, Mixtral)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if kind == "sliding_attention" else None for kind in layer_types[:num_layers]]
    enabled = window and getattr(config, "use_sliding_window", True) is not False
    return [window if enabled else None] * num_layers


def kv_window(layout: tuple[LayerCache, ...]) -> int | None:
    """How many of a sequence's latest tokens any layer still reads: the widest window when every layer has
    one (older KV can be freed), None when some layer attends to everything."""
    windows = [layer.window for layer in layout]
    return None if None in windows else max(windows)


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    token_offset: int
    """Where the chunk's queries start in the step's token layout."""
    num_tokens: int
    start: int
    """Position of the chunk's first token in its sequence; 0 means nothing is cached before it."""
    slots: torch.Tensor | None = None
    """[start + num_tokens] cache slots of the whole context, for chunks that continue a sequence."""
    mask: torch.Tensor | None = None
    """[num_tokens, start + num_tokens] causal mask offset by `start`, for chunks that continue a sequence."""

    def window_mask(self, window: int) -> torch.Tensor | None:
        """The chunk's mask when its layer attends through a sliding window; None when the window reaches
        every key the chunk has."""
        if self.start + self.num_tokens <= window:
            return None
        # Keys are the whole context 0 .. start + num_tokens - 1 (for a first chunk, its own tokens).
        queries = torch.arange(self.start, self.start + self.num_tokens)[:, None]
        keys = torch.arange(self.start + self.num_tokens)[None, :]
        return (keys <= queries) & (keys > queries - window)


def continuing_chunk_mask(start: int, end: int, device: torch.device | None = None) -> torch.Tensor:
    """The `mask` of a chunk of positions start..end-1: query i (at start + i) sees keys 0 .. start + i."""
    return torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None]


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Everything attention needs about a step, built once and shared by all layers."""

    slot_mapping: torch.Tensor
    """[num_tokens] where each new token's K/V is written."""
    num_decodes: int
    decodes: Any
    """Whatever the backend's `prepare_decodes` built for the step's decoding sequences."""
    prefills: tuple[PrefillChunk, ...]


class AttentionBackend(Protocol):
    """Writes the step's new K/V into the layer's cache, then attends each query to its sequence's context.
    q: [T, H, D]; k, v: [T, KV, D]; caches: [KV, slots, D]. Returns [T, H, D]."""

    def prepare_decodes(
        self, block_tables: np.ndarray, context_lens: np.ndarray, block_size: int, device: torch.device
    ) -> Any:
        """Once per step: per-backend tables for the decoding sequences (rows sorted longest first)."""
        ...

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Decoding sequences of similar context length, padded to the longest of them."""

    token_offset: int
    num_seqs: int
    slots: torch.Tensor
    """[num_seqs * max_context] cache slots of each sequence's context, padded, flattened."""
    bias: torch.Tensor
    """[1, num_seqs, 1, max_context] float32: 0 where the slot belongs to the context, -inf for padding."""
    context_lens: torch.Tensor
    """[num_seqs] each sequence's context length (sliding windows mask what lies before its last tokens)."""

    def window_bias(self, window: int) -> torch.Tensor:
        """`bias` with the keys before each sequence's last `window` tokens masked too."""
        positions = torch.arange(self.bias.shape[-1], device=self.bias.device)
        outside = positions[None, :] < (self.context_lens[:, None] - window)
        return self.bias.masked_fill(outside[None, :, None, :], float("-inf"))


# A decode joins the current group while its context is at least this share of the group's longest: the
# torch backend's decode attention is bound by the memory it gathers, padding included. A few groups at
# most, since each costs a handful of extra kernel launches per layer.
_MIN_FILL = 0.6
_MAX_DECODE_GROUPS = 4


class TorchPagedAttention:
    """Reference backend built from torch ops; runs on CPU and CUDA."""

    def prepare_decodes(
        self, block_tables: np.ndarray, context_lens: np.ndarray, block_size: int, device: torch.device
    ) -> tuple[DecodeGroup, ...]:
        groups = []
        first = 0
        for i in range(1, len(context_lens) + 1):
            if i == len(context_lens) or (
                context_lens[i] < _MIN_FILL * context_lens[first] and len(groups) < _MAX_DECODE_GROUPS - 1
            ):
                groups.append(
                    _decode_group(block_tables[first:i], context_lens[first:i], first, block_size, device)
                )
                first = i
        return tuple(groups)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        if v_cache is not k_cache:
            v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        out = torch.empty_like(q)
        if meta.num_decodes:
            out[: meta.num_decodes] = self.decode(
                q[: meta.num_decodes], k_cache, v_cache, meta.decodes, scale, window
            )
        for chunk in meta.prefills:
            rows = slice(chunk.token_offset, chunk.token_offset + chunk.num_tokens)
            out[rows] = _prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, chunk, scale, window)
        return out

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        groups: tuple[DecodeGroup, ...],
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        for group in groups:
            rows = slice(group.token_offset, group.token_offset + group.num_seqs)
            bias = group.bias if window is None else group.window_bias(window)
            out[rows] = _decode_attention(q[rows], k_cache, v_cache, group.slots, bias, scale)
        return out


def _decode_group(
    block_tables: np.ndarray, context_lens: np.ndarray, offset: int, block_size: int, device: torch.device
) -> DecodeGroup:
    max_len = int(context_lens.max())
    num_blocks = -(-max_len // block_size)
    slots = (block_tables[:, :num_blocks, None] * block_size + np.arange(block_size)).reshape(
        len(context_lens), -1
    )
    bias = np.where(np.arange(max_len)[None, :] < context_lens[:, None], 0.0, -np.inf).astype(np.float32)
    return DecodeGroup(
        token_offset=offset,
        num_seqs=len(context_lens),
        slots=torch.as_tensor(np.ascontiguousarray(slots[:, :max_len]).reshape(-1), device=device),
        bias=torch.as_tensor(bias, device=device)[None, :, None, :],
        context_lens=torch.as_tensor(context_lens, device=device),
    )


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """A chunk of consecutive queries of one sequence, causal over everything before them (or over the last
    `window` keys of each query)."""
    if chunk.start == 0:
        keys, values = k.transpose(0, 1), v.transpose(0, 1)
    else:
        keys, values = k_cache.index_select(1, chunk.slots), v_cache.index_select(1, chunk.slots)
    mask = chunk.window_mask(window) if window is not None else None
    if mask is None:
        mask = chunk.mask
    return F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        keys.unsqueeze(0),
        values.unsqueeze(0),
        attn_mask=mask.to(q.device) if mask is not None else None,
        is_causal=mask is None and chunk.start == 0,
        scale=scale,
        enable_gqa=True,
    )[0].transpose(0, 1)


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence against its padded context, as two batched matmuls. On CPU this is an order
    of magnitude faster than SDPA's flash kernel, which is built for long query blocks."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    context = bias.shape[-1]
    # [KV, N, L, D]; query heads grouped by the KV head they share: [KV, N, G, D].
    keys = k_cache.index_select(1, slots).view(num_kv_heads, num_seqs, context, head_dim)
    values = keys if v_cache is k_cache else v_cache.index_select(1, slots).view(keys.shape)
    grouped = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float().mul_(scale).add_(bias)
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).transpose(0, 1).reshape(num_seqs, num_heads, head_dim)
