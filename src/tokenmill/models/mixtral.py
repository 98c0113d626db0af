"""Mixtral: Mistral's attention (sliding window on every layer when set) with a sparse MoE block in every
layer: top-k of `num_local_experts` SwiGLU experts, routing weights renormalised and kept in float32."""

from __future__ import annotations

import re

from transformers import PretrainedConfig

from tokenmill.models.llama import Attention, DecoderLayer
from tokenmill.models.moe import MoEForCausalLM, SparseMoEBlock

# Mixtral's expert names -> Qwen-MoE's (the vocabulary MoEForCausalLM loads).
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_WEIGHT = re.compile(r"\.experts\.(\d+)\.(w[123])\.")


class MixtralForCausalLM(MoEForCausalLM):
    def decoder_layer(self, config: PretrainedConfig, index: int, window: int | None) -> DecoderLayer:
        moe = SparseMoEBlock(
            config.hidden_size,
            config.intermediate_size,
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            normalize=True,
            weights_in_model_dtype=False,
        )
        return DecoderLayer(config, Attention(config, qkv_bias=False, window=window), moe)

    def checkpoint_name(self, name: str) -> str:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        return _EXPERT_WEIGHT.sub(lambda m: f".experts.{m[1]}.{_EXPERT_NAMES[m[2]]}.", name)
