"""Tiny random-weight checkpoints of every supported architecture, written as real Hugging Face directories
(config.json, sharded safetensors, the real SmolLM2 tokenizer) so tests exercise the same loading path as
users. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    Gemma3TextConfig,
    Glm4Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB_SIZE = 49152  # the SmolLM2 tokenizer's
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)

ARCHITECTURES: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(**_COMMON, tie_word_embeddings=True, rope_theta=100000.0),
    "llama3": LlamaConfig(
        **{**_COMMON, "num_key_value_heads": 1},
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": MistralConfig(**_COMMON, tie_word_embeddings=False, sliding_window=None, head_dim=16),
    # Every layer attends through a window shorter than most test prompts.
    "mistral-window": MistralConfig(**_COMMON, tie_word_embeddings=False, sliding_window=12, head_dim=16),
    "qwen2": Qwen2Config(**_COMMON, tie_word_embeddings=True),
    # Local layers (window 8, rope base 10k) around a global one (linear rope scaling); score scale apart
    # from head_dim; final logits softcapped.
    "gemma3": Gemma3TextConfig(
        **{**_COMMON, "num_hidden_layers": 4},
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        final_logit_softcapping=10.0,
        tie_word_embeddings=True,
    ),
    # head_dim apart from hidden/heads; q_norm/k_norm per head.
    "qwen3": Qwen3Config(**_COMMON, head_dim=32, attention_bias=False, tie_word_embeddings=True),
    # Layers 1 and 2 attend through a window shorter than most test prompts (layer_types from max_window_layers).
    "qwen3-window": Qwen3Config(
        **{**_COMMON, "num_hidden_layers": 3},
        head_dim=32,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        attention_bias=True,
        tie_word_embeddings=True,
    ),
    # Half of each head rotated (GLM's adjacent pairs); pad_token_id's default 151329 lies outside the vocab.
    "glm4": Glm4Config(
        **_COMMON, head_dim=16, partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0
    ),
    # 4 experts, top-2, in every layer; routing weights renormalised.
    "mixtral": MixtralConfig(
        **_COMMON, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False
    ),
    # Layer 0 dense (mlp_only_layers), layer 1 sparse with a gated shared expert; top-k not renormalised.
    "qwen2-moe": Qwen2MoeConfig(
        **_COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        norm_topk_prob=False,
        mlp_only_layers=[0],
        tie_word_embeddings=False,
    ),
    # decoder_sparse_step=2: layer 0 dense, layer 1 sparse; per-head q/k norms; top-k renormalised.
    "qwen3-moe": Qwen3MoeConfig(
        **_COMMON,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=2,
        tie_word_embeddings=True,
    ),
    # MLA with a latent KV cache (kv_lora_rank 32 + rope 8, inside the C decode kernel's limits); layer 0
    # dense, layer 1 routed: 4 experts in 2 groups, top-2 from the best group, plus a shared expert.
    "deepseek-v2": DeepseekV2Config(
        **{**_COMMON, "num_key_value_heads": 4},
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        first_k_dense_replace=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.0,
        n_shared_experts=1,
        moe_intermediate_size=32,
    ),
    # Queries through the q_a/q_b low-rank pair, YaRN rope (cos/sin and softmax scale by mscale), biases,
    # greedy routing over all experts in layers 1 and 2.
    "deepseek-v2-q-lora": DeepseekV2Config(
        **{**_COMMON, "num_key_value_heads": 4, "num_hidden_layers": 3},
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        attention_bias=True,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        first_k_dense_replace=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        topk_method="greedy",
        n_shared_experts=1,
        moe_intermediate_size=32,
    ),
}


def build_tiny_model(
    arch: str, directory: Path, tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides: object
) -> Path:
    """Write a random-weight checkpoint of `arch` (config fields replaced by `overrides`); returns the directory."""
    config = ARCHITECTURES[arch]
    if overrides:
        config = type(config)(**{**config.to_dict(), **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform logits (std ~0.16); sharpen them so greedy choices are rarely near-ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.save_pretrained(directory, max_shard_size="2MB")
    tokenizer.save_pretrained(directory)
    return directory


def load_reference(directory: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def make_adapter(base: torch.nn.Module, directory: Path, seed: int, config: object) -> Path:
    """A PEFT adapter with random A and B (init_lora_weights=False), so its delta is not zero; B is scaled
    up so that the delta, not just the tiny model's large embeddings, decides some greedy tokens."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(5.0)
    model.save_pretrained(directory)
    return directory
