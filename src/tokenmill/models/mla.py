"""Multi-head Latent Attention (DeepSeek-V2): the KV cache holds one compressed latent per token, not K and V.

Per token, kv_a_proj_with_mqa gives a latent c (kv_lora_rank, normed by kv_a_layernorm) and one rotary key
part k_pe shared by every head; kv_b_proj would expand c into each head's key (W_UK) and value (W_UV). We
never expand: q_nope . (W_UK c) = (W_UK^T q_nope) . c, so each query head is taken into the latent space
instead ("absorbed") and attends, as multi-query attention with a single KV head, over the cached
[c | k_pe]. That one vector is key and value alike: the first kv_lora_rank dims of the result are the
probability-weighted latent, which W_UV then turns into the head's value. kv_b_proj is loaded straight into
the two batched-matmul operands, W_UK [H, nope, rank] and W_UV^T [H, rank, v].

Rotary: transformers rotates interleaved pairs (2i, 2i+1) as complex numbers. The rope rows of the query
and key projections are reordered at load (even dims first, then odd) so the usual rotate-half rotary (and
its kernel) computes the same dot products.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PretrainedConfig

from tokenmill.models.attention import AttentionBackend, AttentionMetadata, LayerCache
from tokenmill.models.errors import UnsupportedModelError
from tokenmill.models.layers import TORCH_OPS, Linear, RMSNorm, inverse_frequencies, rope_parameters
from tokenmill.models.llama import copy_weight
from tokenmill.models.lora_layers import LoRALayer

SUPPORTED_ROPE_TYPES = ("default", "yarn")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inverse_frequencies(
    dim: int, params: dict, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """YaRN (as transformers computes it): original frequencies for the fast-rotating dims, divided by
    `factor` for the slow ones, a linear ramp in between; and the factor the cos/sin tables are scaled by."""
    base = float(params["rope_theta"])
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # Same operations in the same order as transformers, so the tables agree to the bit.
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    keep_original = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep_original) + (1.0 / pos_freqs) * keep_original
    return inv_freq, float(attention_factor)


class LatentRotary(nn.Module):
    """cos/sin tables (float32, rotate-half layout) for the rope dims of MLA heads, read by `ops.rope` like
    RotaryEmbedding's; YaRN's attention factor is folded into them, as transformers scales its cos/sin."""

    def __init__(
        self, rope_dim: int, max_positions: int, config: PretrainedConfig, architecture: str
    ) -> None:
        super().__init__()
        params = rope_parameters(config)
        rope_type = params["rope_type"]
        if rope_type == "default":
            inv_freq, attention_factor = inverse_frequencies(rope_dim, params), 1.0
        elif rope_type == "yarn":
            inv_freq, attention_factor = yarn_inverse_frequencies(
                rope_dim, params, config.max_position_embeddings
            )
        else:
            raise UnsupportedModelError(
                f"{architecture}: rope_scaling type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_factor, persistent=False)


def softmax_scale(config: PretrainedConfig) -> float:
    """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim)² where a scaled rope asks for it."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params["rope_type"] != "default" and params.get("mscale_all_dim"):
        scale *= yarn_mscale(float(params["factor"]), float(params["mscale_all_dim"])) ** 2
    return scale


def deinterleave_rope_rows(tensor: torch.Tensor, block: int, rope_start: int, rope_dim: int) -> torch.Tensor:
    """In every `block` rows of a weight (or bias), the rope rows from `rope_start` on reordered from
    transformers' interleaved pairs (2i, 2i + 1) to rotate-half's (i, i + rope_dim / 2)."""
    order = torch.arange(block)
    pairs = torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)))
    order[rope_start : rope_start + rope_dim] = rope_start + pairs
    blocks = tensor.reshape(-1, block, *tensor.shape[1:])
    return blocks[:, order].reshape(tensor.shape)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.head_dim = self.kv_lora_rank + self.rope_dim  # of the cached latent and the absorbed queries
        self.scale = softmax_scale(config)
        hidden, heads, bias = config.hidden_size, self.num_heads, bool(config.attention_bias)
        q_size = heads * (self.nope_dim + self.rope_dim)
        if self.q_lora_rank is None:
            self.q_proj = Linear(hidden, q_size, bias=False)
        else:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, q_size, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        # kv_b_proj, split per head into the absorbed operands (see the module docstring).
        self.w_uk = nn.Parameter(torch.empty(heads, self.nope_dim, self.kv_lora_rank))
        self.w_uv = nn.Parameter(torch.empty(heads, self.kv_lora_rank, self.v_head_dim))
        self.o_proj = Linear(heads * self.v_head_dim, hidden, bias=bias)
        self.cache = LayerCache(num_heads=1, head_dim=self.head_dim, group_size=heads, shared_kv=True)
        self.ops = TORCH_OPS

    def forward(
        self,
        x: torch.Tensor,
        rope: object,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        lora: LoRALayer | None = None,
    ) -> torch.Tensor:
        tokens, heads, rank = x.shape[0], self.num_heads, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))[0])
        q_nope, q_pe = q.view(tokens, heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)[0]
        # Query and key rope parts side by side in one tensor: the rotary kernel takes both in one call.
        pe = torch.cat((q_pe, k_pe.unsqueeze(1)), dim=1)
        q_pe, k_pe = self.ops.apply_rotary(pe[:, :heads], pe[:, heads:], rope)
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk)  # [H, T, rank]
        query = torch.cat((q_latent.transpose(0, 1), q_pe), dim=-1)
        key = torch.cat((latent.unsqueeze(1), k_pe), dim=-1)  # [T, 1, rank + rope]: key and value
        out = backend(query, key, key, kv_cache[0], kv_cache[1], meta, self.scale, None)
        values = torch.bmm(out[..., :rank].transpose(0, 1), self.w_uv)  # [H, T, v]
        return self.o_proj(values.transpose(0, 1).reshape(tokens, heads * self.v_head_dim))

    @torch.no_grad()
    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one Hugging Face tensor (`name` relative to self_attn) into its place."""
        module = name.rpartition(".")[0]
        if module == "kv_b_proj":
            expected = (self.num_heads * (self.nope_dim + self.v_head_dim), self.kv_lora_rank)
            if tensor.shape != expected:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {expected}")
            per_head = tensor.view(self.num_heads, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
            copy_weight(self.w_uk, per_head[:, : self.nope_dim], name)
            copy_weight(self.w_uv, per_head[:, self.nope_dim :].transpose(1, 2), name)
            return
        if module in ("q_proj", "q_b_proj"):
            tensor = deinterleave_rope_rows(
                tensor, self.nope_dim + self.rope_dim, self.nope_dim, self.rope_dim
            )
        elif module == "kv_a_proj_with_mqa":
            tensor = deinterleave_rope_rows(tensor, self.head_dim, self.kv_lora_rank, self.rope_dim)
        copy_weight(self.get_parameter(name), tensor, name)
