"""Tiny random-weight checkpoints of every supported architecture, written as real Hugging Face directories
(config.json, sharded safetensors, the real SmolLM2 tokenizer) so tests exercise the same loading path as
users. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
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
    "qwen2": Qwen2Config(**_COMMON, tie_word_embeddings=True),
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
