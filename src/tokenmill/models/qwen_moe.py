"""Qwen2-MoE and Qwen3-MoE: Qwen2's (qkv bias) or Qwen3's (per-head q/k norms) attention, and per layer
either a dense SwiGLU MLP or a sparse MoE block, as `decoder_sparse_step` and `mlp_only_layers` say.
Qwen2-MoE adds a shared expert every token goes through, gated by sigmoid(shared_expert_gate(x))."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from tokenmill.models.layers import GatedMLP
from tokenmill.models.llama import Attention, DecoderLayer
from tokenmill.models.moe import MoEForCausalLM, SparseMoEBlock
from tokenmill.models.qwen3 import Qwen3Attention


def is_sparse_layer(config: PretrainedConfig, index: int) -> bool:
    """transformers' rule: every `decoder_sparse_step`-th layer is sparse, unless listed in mlp_only_layers."""
    mlp_only = getattr(config, "mlp_only_layers", None) or []
    step = getattr(config, "decoder_sparse_step", 1)
    return index not in mlp_only and config.num_experts > 0 and (index + 1) % step == 0


class Qwen2MoeForCausalLM(MoEForCausalLM):
    has_shared_expert = True

    def attention(self, config: PretrainedConfig, window: int | None) -> nn.Module:
        return Attention(config, qkv_bias=bool(getattr(config, "qkv_bias", True)), window=window)

    def decoder_layer(self, config: PretrainedConfig, index: int, window: int | None) -> DecoderLayer:
        if not is_sparse_layer(config, index):
            mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        else:
            mlp = SparseMoEBlock(
                config.hidden_size,
                config.moe_intermediate_size,
                num_experts=config.num_experts,
                top_k=config.num_experts_per_tok,
                normalize=bool(config.norm_topk_prob),
                weights_in_model_dtype=True,
                shared_expert_size=config.shared_expert_intermediate_size if self.has_shared_expert else None,
            )
        return DecoderLayer(config, self.attention(config, window), mlp)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    has_shared_expert = False

    def attention(self, config: PretrainedConfig, window: int | None) -> nn.Module:
        return Qwen3Attention(config, qkv_bias=bool(getattr(config, "attention_bias", False)), window=window)
