"""Qwen3: the Llama layout plus an RMSNorm over each query and key head (q_norm/k_norm) before rotary.

Everything else (fused qkv and gate_up, Hugging Face weight names, the layer's residual flow, sliding-window
layers from `layer_types`) is Llama's, so this module only swaps in the attention.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from tokenmill.models.layers import RMSNorm
from tokenmill.models.llama import Attention, DecoderLayer, LlamaForCausalLM


class Qwen3Attention(Attention):
    """Llama's attention with q_norm/k_norm: one RMSNorm weight of head_dim shared by all query heads, one
    by all key heads, applied per head after the projection and before rotary."""

    def __init__(self, config: PretrainedConfig, qkv_bias: bool, window: int | None = None) -> None:
        super().__init__(config, qkv_bias, window)
        # RMSNorm only holds the weights (checkpoint names self_attn.q_norm.weight / k_norm.weight); the
        # per-head normalisation itself is `_norm_heads`.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def queries_and_keys(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qk_size = self.q_size + self.kv_size
        qk = self._norm_heads(qkv[:, :qk_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim))
        return qk.split([self.num_heads, self.num_kv_heads], dim=1)

    def _norm_heads(self, qk: torch.Tensor) -> torch.Tensor:
        """q_norm over the query heads and k_norm over the key heads of qk [T, H + KV, D], into one new
        tensor: q and k stay adjacent in it, so the fused rotary kernel still takes both in one call (the
        ops' add_rms_norm wants one weight for all rows, which the two norms do not share)."""
        x32 = qk.float()
        # transformers' RMSNorm numerics: float32 statistics, cast back, then times the weight.
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.q_norm.eps)).to(qk.dtype)
        normed[:, : self.num_heads].mul_(self.q_norm.weight)
        normed[:, self.num_heads :].mul_(self.k_norm.weight)
        return normed


class Qwen3ForCausalLM(LlamaForCausalLM):
    supports_lora = False
    """The LoRA hooks are Llama's, but adapters are only tested (and offered) on the Llama family."""

    def decoder_layer(self, config: PretrainedConfig, index: int, window: int | None) -> DecoderLayer:
        return DecoderLayer(
            config, Qwen3Attention(config, bool(getattr(config, "attention_bias", False)), window)
        )
